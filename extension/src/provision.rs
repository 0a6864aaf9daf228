//! Organization -> Polar team customer. The org row is the job: while its
//! polar_customer_id is NULL it is due for provisioning. All SQL, in provision.sql.
pgrx::extension_sql_file!("provision.sql", name = "provision", requires = ["outbox"]);
