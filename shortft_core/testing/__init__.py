"""Tools for the tests and the benchmarks, not for users: random-weight models of the real architectures
(:mod:`.random_models`), the activation-memory and cost profilers (:mod:`.profiling`) and what two backends'
parity compares (:mod:`.parity`). Nothing in the library, the command line or the nodes imports this package."""
