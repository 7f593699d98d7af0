"""The live lane: the worker that polls the FHIR server, decides through the core and posts alerts
(`worker`), its state stores (`store/`), the patient-context directory (`directory`), the service
process (`app`, `web`), the start-up probe (`probe`) and the profile install command (`profiles`)."""
