//! Content digests (`sha256:<64 hex>`), the keys of the content-addressed store.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

/// A damage check kept in a 32-byte checksum field (the tree's, the small-file map's): the
/// CRC-32 of `parts` in its first 4 bytes (little-endian), the rest zero. It finds damage (a
/// torn write, a flipped byte), not tampering: the file holds its own checksum.
pub(crate) fn crc32_field(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = crc32fast::Hasher::new();
    for p in parts {
        h.update(p);
    }
    let mut sum = [0u8; 32];
    sum[..4].copy_from_slice(&h.finalize().to_le_bytes());
    sum
}

/// A sha256 content digest. Other algorithms are refused when parsed: every digest this
/// project handles must be checkable by it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

/// Why a digest string could not be parsed.
#[derive(Debug, thiserror::Error)]
#[error("invalid digest {0:?}: expected sha256:<64 lowercase hex digits>")]
pub struct DigestParseError(pub String);

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(Sha256::digest(bytes).into())
    }

    /// The 64 lowercase hex digits, without the algorithm prefix (used as a file name).
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 12 hex digits, for messages and tables.
    pub fn short(&self) -> String {
        self.hex()[..12].to_string()
    }
}

/// Incremental sha256 that yields a [`Digest`].
#[derive(Default, Clone)]
pub struct Hasher(Sha256);

impl Hasher {
    /// Feeds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    /// The digest of everything fed so far.
    pub fn finish(self) -> Digest {
        Digest(self.0.finalize().into())
    }
}

impl FromStr for Digest {
    type Err = DigestParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || DigestParseError(s.to_string());
        let hex_part = s.strip_prefix("sha256:").ok_or_else(err)?.as_bytes();
        if hex_part.len() != 64 {
            return Err(err());
        }
        // By hand (lowercase only): a zstd:chunked table parses one per file, tens of
        // thousands before a lazy mount is live.
        let val = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        let mut out = [0u8; 32];
        for (o, pair) in out.iter_mut().zip(hex_part.chunks_exact(2)) {
            *o = (val(pair[0]).ok_or_else(err)? << 4) | val(pair[1]).ok_or_else(err)?;
        }
        Ok(Digest(out))
    }
}

/// JSON (images.json, `--json` output) gets `"sha256:<hex>"`; binary formats (indexes, trees)
/// the 32 raw bytes. Older `images.json` files wrote 32-integer arrays: still accepted.
impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            self.0.serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Text {
            Str(String),
            Bytes([u8; 32]),
        }
        if d.is_human_readable() {
            match Text::deserialize(d)? {
                Text::Str(s) => s.parse().map_err(serde::de::Error::custom),
                Text::Bytes(b) => Ok(Digest(b)),
            }
        } else {
            <[u8; 32]>::deserialize(d).map(Digest)
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_bad_input() {
        let d = Digest::of(b"hello");
        let s = d.to_string();
        assert_eq!(
            s,
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(s.parse::<Digest>().unwrap(), d);
        for bad in [
            "sha512:2cf2",
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
            "sha256:2CF24DBA5FB0A30E26E83B2AC5B9E29E1B161E5C1FA7425E73043362938B9824",
            "sha256:../../etc/passwd",
            "sha256:zz24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
            "sha256:2cF24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b982",
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b98244",
            "sha256:éf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad}");
        }
    }

    #[test]
    fn json_is_a_string_binary_is_bytes() {
        let d = Digest::of(b"hello");
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, format!("\"{d}\""));
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
        let old = serde_json::to_string(&d.0).unwrap();
        assert_eq!(serde_json::from_str::<Digest>(&old).unwrap(), d);
        let bin = postcard::to_allocvec(&d).unwrap();
        assert_eq!(bin.len(), 32);
        assert_eq!(postcard::from_bytes::<Digest>(&bin).unwrap(), d);
    }
}
