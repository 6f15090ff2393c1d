//! Reads of the read models, time travel and the live feed. Built by the
//! read-side issue; the crate exists so the workspace has the layout of DESIGN.md.
