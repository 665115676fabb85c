//! The dial-out transport shared by the API server and node agents (and, later, the cloud
//! link): one place for the wire format of the node tunnel's streams.
//!
//! [`frames`]: exec, attach and port-forward data between the API server and a node agent
//! travel as frames of channel (one byte), length (u32, big endian) and payload, bounded by
//! [`frames::MAX_FRAME`] so a peer's length field cannot make the reader buffer without limit.

pub mod frames;
