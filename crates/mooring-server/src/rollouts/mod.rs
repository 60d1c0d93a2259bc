//! Rollouts (issue 19): an artifact sent to a target in waves, each gated on the health of the
//! devices already updated against a control cohort kept on the old version.
//!
//! [`plan`] holds the decisions, pure and deterministic: the random but reproducible choice of
//! waves and control cohort, the health gate, the abort threshold and the throttle.

pub mod plan;
