//! Harness for the end-to-end suites, in three parts: the cluster and its
//! per-test databases, the processes (polar-meterd, the emulator, a webhook),
//! and the assertions. `make test` starts the cluster (scripts/cluster.sh)
//! with a template database that has the extension installed.
pub mod assertions;
pub mod certs;
pub mod cluster;
pub mod processes;

pub use assertions::*;
pub use cluster::*;
pub use processes::*;
