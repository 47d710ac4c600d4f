//! The keyed hash that indexes the engine's tables of sender-chosen keys (fragment
//! datagrams, TCP streams, the flows of the `flow`/`flowbits` options): SipHash-1-3 (Aumasson and Bernstein, 2012; the variant Rust's
//! `HashMap` uses) under a secret key, so that a sender who does not know the key cannot
//! choose keys that land in one probe window, to push a victim's entry out or have new
//! entries refused. A plain mixing function is predictable.

use core::hash::Hasher;
use core::net::IpAddr;
use siphasher::sip::SipHasher13;

/// The canonical (order-independent) byte form of a flow: its protocol, its two endpoints and
/// its frames' VLAN IDs ([`super::packet::Packet::vlans`]).
pub fn flow_key(proto: u8, a: (IpAddr, u16), b: (IpAddr, u16), vlans: u32) -> [u8; 42] {
    let bits = |(ip, port): (IpAddr, u16)| {
        let x = match ip {
            IpAddr::V4(v) => u128::from(u32::from(v)),
            IpAddr::V6(v) => u128::from(v),
        };
        (x, port)
    };
    let (lo, hi) = if bits(a) <= bits(b) { (a, b) } else { (b, a) };
    let mut k = [0u8; 42];
    k[0] = u8::from(lo.0.is_ipv6());
    k[1..17].copy_from_slice(&bits(lo).0.to_le_bytes());
    k[17..19].copy_from_slice(&lo.1.to_le_bytes());
    k[19..35].copy_from_slice(&bits(hi).0.to_le_bytes());
    k[35..37].copy_from_slice(&hi.1.to_le_bytes());
    k[37..41].copy_from_slice(&vlans.to_le_bytes());
    k[41] = proto;
    k
}

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
    fn flow_keys_ignore_direction_but_not_vlans_or_protocol() {
        let a = ("10.0.0.1".parse().unwrap(), 1);
        let b = ("10.0.0.2".parse().unwrap(), 2);
        assert_eq!(flow_key(6, a, b, 7), flow_key(6, b, a, 7));
        assert_ne!(flow_key(6, a, b, 7), flow_key(6, a, b, 8));
        assert_ne!(flow_key(6, a, b, 7), flow_key(17, a, b, 7));
    }

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
