//! The Llama-family decoder (Llama, SmolLM2, Qwen2): its configuration, its
//! parameters, its arithmetic (with input capture and the backward's tape)
//! and the model that holds them.

pub(crate) mod config;
pub(crate) mod forward;
pub(crate) mod head;
pub(crate) mod model;
pub(crate) mod positional;
pub(crate) mod stages;
pub(crate) mod store;
pub(crate) mod weights;
