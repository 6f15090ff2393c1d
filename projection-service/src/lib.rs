//! Projection workers that fold the event log into read models (pipeline,
//! customer history, audit). Built by the read-side issue; the crate exists so
//! the workspace has the layout of DESIGN.md.
