//! Operator-facing surface: the metric handles every other module updates, in one place.

pub mod metrics;
