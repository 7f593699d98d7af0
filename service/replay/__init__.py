"""The offline lane: the core over FHIR files, in order of availability (`engine`), and its
partitioned form for large inputs (`parallel`). Replay is the oracle the live loop is tested against."""
