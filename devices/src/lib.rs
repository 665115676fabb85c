//! EdgeSite devices: KubeEdge-compatible device management.
//!
//! - [`crd`]: the Device and DeviceModel CRDs the server installs;
//! - [`controller`]: the site-side device controller (checks devices against their models and
//!   nodes, and says what is wrong in Events);
//! - [`eventbus`]: the node's MQTT broker (embedded rumqttd) or an external one;
//! - [`twin`] (pure rules) and [`devicetwin`] (MQTT, API sync, status outbox), the node side;
//! - [`store`]: the node's device file;
//! - [`mapper`]: the SDK the bundled mappers (Modbus TCP, virtual) are written with.
//!
//! Path of a desired value: Device spec -> the node's twin (watch of its devices) -> MQTT
//! `twin/update/delta` -> mapper -> device. Path of a reading: mapper -> MQTT `twin/update` ->
//! twin (stored, answered) -> outbox -> `Device.status`.

pub mod controller;
pub mod crd;
pub mod devicetwin;
pub mod eventbus;
pub mod logins;
pub mod mapper;
pub mod modbus;
pub mod pod_logins;
pub mod store;
pub mod twin;
