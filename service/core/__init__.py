"""The pure clinical core: plain data in, decisions out. No I/O, no clock, no logging.

Citations of the form "reference §N" are sections of docs/clinical-reference.md, the project's
clinical and FHIR reference, where each fact names its public source."""
