// The extensions neutrowatch puts on its Flag, Communication and Provenance.
// Codes: terminology.fsh (generated from the service's own grading schemes and event kinds).

Invariant: nw-anc-1
Description: "The absolute neutrophil count is not negative"
Expression: "$this >= 0"
Severity: #error

Extension: NeutrowatchAnc
Id: neutrowatch-anc
Title: "Absolute neutrophil count"
Description: "The absolute neutrophil count (ANC) the alert rests on, in cells per microlitre (UCUM `/uL`). The comparator `<=` says the true ANC is at most this value (an input result was reported as below a bound). On the Flag: the latest ANC of the episode; on the Communication: the ANC announced."
Context: Flag, Communication
* value[x] 1..1
* value[x] only Quantity
* valueQuantity.value 1..1
* valueQuantity.value obeys nw-anc-1
* valueQuantity.unit 1..1
* valueQuantity.system 1..1
* valueQuantity.system = "http://unitsofmeasure.org" (exactly)
* valueQuantity.code 1..1
* valueQuantity.code = #/uL (exactly)

Extension: NeutrowatchGrade
Id: neutrowatch-grade
Title: "Neutropenia grade"
Description: "The grade in the grading scheme in force, by the scheme's own label (e.g. CTCAE v5.0 grade 3); the code system's is-a hierarchy gives the severity (mild, moderate, severe). On the Flag: the worst grade announced in the episode; on the Communication: the grade announced (for a resolution the grade it resolved from, for a withdrawal the grade withdrawn)."
Context: Flag, Communication
* value[x] 1..1
* value[x] only Coding
* valueCoding from NeutrowatchGradeVS (required)
* valueCoding.system 1..1
* valueCoding.code 1..1

Extension: NeutrowatchGradingScheme
Id: neutrowatch-grading-scheme
Title: "Grading scheme"
Description: "The grading scheme that turned the ANC into a grade (the service's `grading.scheme`)."
Context: Flag, Communication, Provenance.agent
* value[x] 1..1
* value[x] only Coding
* valueCoding from NeutrowatchGradingSchemeVS (required)
* valueCoding.system 1..1
* valueCoding.code 1..1

Extension: NeutrowatchAlertEvent
Id: neutrowatch-alert-event
Title: "Alert event"
Description: "What happened to the neutropenia episode: new, worsening, resolved, febrile, chronic, or the withdrawal of an earlier announcement (retracted)."
Context: Communication, Provenance
* value[x] 1..1
* value[x] only Coding
* valueCoding from NeutrowatchAlertEventVS (required)
* valueCoding.system 1..1
* valueCoding.code 1..1

Extension: NeutrowatchSoftwareVersion
Id: neutrowatch-software-version
Title: "Software version"
Description: "The version of the neutrowatch software that made the decision (the installed Python distribution's version). Together with the grading scheme on the same agent it identifies the algorithm."
Context: Provenance.agent
* value[x] 1..1
* value[x] only string
