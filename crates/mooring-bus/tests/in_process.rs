//! The conformance suite against [`InProcessBus`], plus its own configuration checks.

use std::sync::Arc;

use mooring_bus::{Bus, BusConfig, BusError, InProcessBus};

async fn fresh_bus(config: BusConfig) -> (Arc<dyn Bus>, ()) {
    let bus = InProcessBus::new(config).expect("in-process bus");
    (Arc::new(bus), ())
}

mooring_bus::conformance_tests!(fresh_bus);

#[test]
fn a_zero_bound_is_refused() {
    let config = BusConfig {
        queue_len_max: 0,
        ..BusConfig::default()
    };
    let err = InProcessBus::new(config).err();
    assert_eq!(
        err,
        Some(BusError::InvalidConfig(
            "queue_len_max must be above 0".into()
        ))
    );
}
