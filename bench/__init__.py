"""The harness: parity matrix, benchmarks, overheads, reports and the `fusedmlp` CLI."""
