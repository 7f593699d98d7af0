"""State stores: cursor, latest Observation versions, pending panels, episodes, outbox, quarantine."""

from .base import Intake, OutboxEntry, PanelWork, Store

__all__ = ["Intake", "OutboxEntry", "PanelWork", "Store"]
