//! The keyed hash that indexes the engine's tables of sender-chosen keys (fragment
//! datagrams, TCP streams): SipHash-1-3 (Aumasson and Bernstein, 2012; the variant Rust's
//! `HashMap` uses) under a secret key, so that a sender who does not know the key cannot
//! choose keys that land in one probe window, to push a victim's entry out or have new
//! entries refused. A plain mixing function (as in [`super::flow`]) is predictable.

use core::hash::Hasher;
use siphasher::sip::SipHasher13;

/// SipHash-1-3 of `bytes` under `key`.
pub fn keyed_hash(key: [u64; 2], bytes: &[u8]) -> u64 {
    let mut h = SipHasher13::new_with_keys(key[0], key[1]);
    h.write(bytes);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_on_the_key_and_every_byte() {
        let msg: [u8; 15] = core::array::from_fn(|i| i as u8);
        let key = [0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908];
        assert_eq!(keyed_hash(key, &msg), keyed_hash(key, &msg));
        assert_ne!(keyed_hash(key, &msg), keyed_hash([1, 2], &msg));
        let mut other = msg;
        other[14] ^= 1;
        assert_ne!(keyed_hash(key, &msg), keyed_hash(key, &other));
        assert_ne!(keyed_hash(key, &msg[..14]), keyed_hash(key, &msg));
    }
}
