// Code systems and definitions from FHIR R4 4.0.1 and THO (as carried by hl7.fhir.r4.core#4.0.1).
Alias: $SCT = http://snomed.info/sct
Alias: $flag-category = http://terminology.hl7.org/CodeSystem/flag-category
Alias: $communication-category = http://terminology.hl7.org/CodeSystem/communication-category
Alias: $provenance-participant-type = http://terminology.hl7.org/CodeSystem/provenance-participant-type
Alias: $v3-DataOperation = http://terminology.hl7.org/CodeSystem/v3-DataOperation
Alias: $flag-detail = http://hl7.org/fhir/StructureDefinition/flag-detail
