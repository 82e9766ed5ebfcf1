//! How events arrive besides the socket: [`table`] follows stabilize's own
//! `events` table as a durable feed.

pub mod table;
