// The resources neutrowatch writes (service/alerts.py build()). Repeating elements that must hold
// one particular value are sliced by pattern (at least one category `clinical`, ...), so other
// values may follow; an extension slice is matched by its url.

Profile: NeutrowatchFlag
Parent: Flag
Id: neutrowatch-flag
Title: "neutrowatch neutropenia Flag"
Description: "One Flag per neutropenia episode, created when the episode opens and updated as it evolves: status `active`, `inactive` once resolved, `entered-in-error` when every alert it rested on was withdrawn. Identified by `<canonical base>/episode|<episode id>` (the conditional-create key)."
* meta 1..1
* meta.profile 1..*
* extension contains
    $flag-detail named detail 0..* and
    NeutrowatchGrade named grade 1..1 and
    NeutrowatchGradingScheme named scheme 1..1 and
    NeutrowatchAnc named anc 0..1
* extension[detail] ^short = "The Observations the ANC was computed from (versioned references)"
* extension[detail].value[x] only Reference(Observation)
* extension[anc] ^short = "The latest ANC of the episode (absent once every result it rested on is withdrawn)"
* identifier 1..1
* identifier.system 1..1
* identifier.value 1..1
* category 1..*
* category ^slicing.discriminator.type = #pattern
* category ^slicing.discriminator.path = "$this"
* category ^slicing.rules = #open
* category contains clinical 1..1
* category[clinical] = $flag-category#clinical
* code from NeutrowatchFlagCode (required)
* code.coding 1..*
* code.text 1..1
* subject only Reference(Patient)
* period 1..1
* period.start 1..1
* author 1..1
* author only Reference(Device or Organization)

Profile: NeutrowatchCommunication
Parent: Communication
Id: neutrowatch-communication
Title: "neutrowatch neutropenia alert Communication"
Description: "One Communication per announcement (new, worsening, resolved, febrile, or a withdrawal), about the episode's Flag (by its identifier) and the Observations used. Identified by `<canonical base>/communication|<episode>-<event>-<rank>[-r<revision>]` (the conditional-create key). A withdrawal points at the announcement it withdraws with `inResponseTo`."
* meta 1..1
* meta.profile 1..*
* extension contains
    NeutrowatchAlertEvent named event 1..1 and
    NeutrowatchGrade named grade 1..1 and
    NeutrowatchGradingScheme named scheme 1..1 and
    NeutrowatchAnc named anc 0..1
* extension[anc] ^short = "The ANC announced (absent for a withdrawal that leaves no value)"
* identifier 1..1
* identifier.system 1..1
* identifier.value 1..1
* inResponseTo 0..1
* inResponseTo only Reference(Communication)
* status = #completed
* category 1..*
* category ^slicing.discriminator.type = #pattern
* category ^slicing.discriminator.path = "$this"
* category ^slicing.rules = #open
* category contains alert 1..1
* category[alert] = $communication-category#alert
* priority 1..1
* subject 1..1
* subject only Reference(Patient)
* about 1..*
* about ^slicing.discriminator.type = #pattern
* about ^slicing.discriminator.path = "type"
* about ^slicing.rules = #open
* about contains flag 1..1
* about[flag] ^short = "The episode's Flag, by its identifier"
* about[flag].type 1..1
* about[flag].type = "Flag"
* about[flag].identifier 1..1
* about[flag].identifier.system 1..1
* about[flag].identifier.value 1..1
* sent 1..1
* sender 1..1
* sender only Reference(Device or Organization)
* payload 1..1
* payload.content[x] only string

Profile: NeutrowatchProvenance
Parent: Provenance
Id: neutrowatch-provenance
Title: "neutrowatch alert Provenance"
Description: "One Provenance per alert write (one per event): which Flag and Communication it produced, from which Observation versions, by which software version and grading scheme. Posted in the same transaction as its targets, which it references by their `urn:uuid` fullUrls (each target also carries the resource's identifier). R4 Provenance has no identifier, so its conditional-create key is a `meta.tag` `<canonical base>/provenance|<key>` (`ifNoneExist: _tag=...`)."
* meta 1..1
* meta.profile 1..*
* meta.tag 1..*
* meta.tag ^short = "The idempotency key: system <canonical base>/provenance, code <episode>-<event>-<rank>[-r<revision>]"
* extension contains NeutrowatchAlertEvent named event 1..1
* target 1..2
* target.reference 1..1
* target.type 1..1
* target.identifier 1..1
* target ^slicing.discriminator.type = #pattern
* target ^slicing.discriminator.path = "type"
* target ^slicing.rules = #closed
* target contains flag 1..1 and communication 0..1
* target[flag].type = "Flag"
* target[flag] ^short = "The episode's Flag as written by this event"
* target[communication].type = "Communication"
* target[communication] ^short = "The Communication of the announcement (none for `chronic`)"
* recorded 1..1
* activity 1..1
* activity from NeutrowatchProvenanceActivity (required)
* activity ^short = "CREATE when the event opens the episode's Flag (`new`), UPDATE when it changes it"
* agent 1..1
* agent.extension contains
    NeutrowatchSoftwareVersion named softwareVersion 1..1 and
    NeutrowatchGradingScheme named scheme 1..1
* agent.type 1..1
* agent.type = $provenance-participant-type#author
* agent.who only Reference(Device or Organization)
* agent.who.reference 1..1
* agent.who.display 1..1
* agent.who ^short = "The service (alerts.author); display: neutrowatch <version>"
* entity.role = #source
* entity.what only Reference(Observation)
* entity.what.reference 1..1
* entity ^short = "The source Observations, versioned (Observation/<id>/_history/<vid>) when the version is known"
