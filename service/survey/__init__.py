"""`survey`: what a site's Observations look like to the service, before it goes live: which codes
it monitors, which local codes look like the terms it needs (a hint with a candidate LOINC code, never
a mapping), units and statuses, panels without an ANC, unresolvable references, and the core's own
reasons for what it would reject. Read-only. Modules: classifier (which codes are known), candidates
(the hints), tally (the counts), sources (files or the server), report (text, JSON), conceptmap (the
draft ConceptMap)."""
