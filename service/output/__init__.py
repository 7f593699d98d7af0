"""What a decision becomes: event records, the replay contract (`events`), the Flag, Communication
and Provenance resources (`alerts`), and the containment that turns a decision or its failure into
records (`outcomes`). Shared by the live and the offline lane, so both write the same things."""
