"""FHIR R4 on the wire: the time grammar (`fhirtime`), the JSON decoding and salvage parser (`raw`,
`jsonscan`), SMART scopes (`scopes`), and the HTTP client (`client`) with its authentication (`auth`).

Import from the submodules: the decoding modules are pure and the clinical core uses them, so this
package does not import the HTTP client on its own."""
