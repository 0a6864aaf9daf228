//! The audit log: append-only (triggers), sealed into a hash chain
//! asynchronously so that recording events never waits on a chain head.
//! All of it is SQL, in audit.sql.
pgrx::extension_sql_file!("audit.sql", name = "audit");
