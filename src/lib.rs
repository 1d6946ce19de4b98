//! Support code shared by the workspace's examples and end-to-end tests:
//! small local servers that misbehave on command.
