//! Several daemons on one Postgres database (issue 10). So far only the
//! partition function, which every later piece (ownership, the table feed
//! of a node, fenced writes) keys on.

pub mod partition;
