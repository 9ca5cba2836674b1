//! The simulated broker's framed protocol: a big-endian `u32` length, then one JSON-encoded
//! [`Frame`]. It is ours, not NATS's text protocol; it only has to carry the same operations.

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest frame accepted, bytes.
pub const FRAME_BYTES_MAX: usize = 4 << 20;

/// Status code of a "no responders" answer, as NATS uses it.
pub const NO_RESPONDERS: u16 = 503;

/// One protocol message, either way.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Frame {
    /// Client → broker, first frame: who is connecting.
    Connect {
        /// The client's name.
        name: String,
    },
    /// Client → broker: subscribe `sid` to `subject`, in `queue` if given.
    Sub {
        /// Subscription id, unique per connection.
        sid: u64,
        /// Subject pattern (`*` and `>` wildcards).
        subject: String,
        /// Queue group.
        queue: Option<String>,
    },
    /// Client → broker: end subscription `sid`.
    Unsub {
        /// Subscription id.
        sid: u64,
    },
    /// Client → broker: publish.
    Pub {
        /// Subject.
        subject: String,
        /// Reply subject.
        reply: Option<String>,
        /// Bytes.
        payload: Vec<u8>,
    },
    /// Broker → client: a message for subscription `sid`.
    Msg {
        /// Subscription id.
        sid: u64,
        /// Subject it was published on.
        subject: String,
        /// Reply subject.
        reply: Option<String>,
        /// Bytes.
        payload: Vec<u8>,
        /// A status instead of a message (503: no responders).
        status: Option<u16>,
    },
    /// Either way: are you there? `id` comes back in the pong.
    Ping {
        /// Echoed by the pong (flushes use it).
        id: Option<u64>,
    },
    /// Either way: here I am.
    Pong {
        /// The ping's id.
        id: Option<u64>,
    },
}

impl Frame {
    /// The frame as bytes on the wire.
    pub fn encode(&self, out: &mut Vec<u8>) {
        // Serialising these plain types cannot fail.
        let body = serde_json::to_vec(self).unwrap_or_default();
        out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
        out.extend_from_slice(&body);
    }
}

/// Reads one frame; an error ends the connection.
pub async fn read_frame(r: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Frame> {
    let len = r.read_u32().await? as usize;
    if len > FRAME_BYTES_MAX {
        return Err(std::io::Error::other(format!("frame of {len} bytes")));
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).await?;
    serde_json::from_slice(&body).map_err(std::io::Error::other)
}

/// Writes frames in one go.
pub async fn write_frames(
    w: &mut (impl AsyncWrite + Unpin),
    frames: &[Frame],
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    for f in frames {
        f.encode(&mut buf);
    }
    w.write_all(&buf).await?;
    w.flush().await
}

/// Whether `subject` matches `pattern` (`*` one token, `>` one or more trailing tokens).
pub fn matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn wildcards_match_as_in_nats() {
        let check =
            |p: &str, s: &str, expected: bool| assert_eq!(matches(p, s), expected, "{p} {s}");
        check("a.b", "a.b", true);
        check("a.b", "a.c", false);
        check("a.*", "a.b", true);
        check("a.*", "a.b.c", false);
        check("a.>", "a.b.c", true);
        check("a.>", "a", false);
        check("*.b", "a.b", true);
        check("a", "a.b", false);
    }
}
