//! Turning a limiter key into a Redis key.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;

/// A key [`RedisLimiter`](crate::RedisLimiter) can limit: it writes itself
/// after the limiter's prefix to name its bucket in Redis.
///
/// Implemented for strings, integers, IP and socket addresses (the keys
/// rate-limit extractors produce), references and smart pointers to those,
/// and `()` (the single bucket of an unkeyed limiter, stored as `global`).
/// Implement it for your own key types; two keys that must not share a
/// bucket must write different text.
pub trait RedisKey {
    /// Appends this key's text to `out`.
    fn write_key(&self, out: &mut String);
}

impl RedisKey for str {
    fn write_key(&self, out: &mut String) {
        out.push_str(self);
    }
}

impl RedisKey for String {
    fn write_key(&self, out: &mut String) {
        out.push_str(self);
    }
}

impl RedisKey for Cow<'_, str> {
    fn write_key(&self, out: &mut String) {
        out.push_str(self);
    }
}

impl RedisKey for () {
    fn write_key(&self, out: &mut String) {
        out.push_str("global");
    }
}

impl<T: RedisKey + ?Sized> RedisKey for &T {
    fn write_key(&self, out: &mut String) {
        (**self).write_key(out);
    }
}

impl<T: RedisKey + ?Sized> RedisKey for Box<T> {
    fn write_key(&self, out: &mut String) {
        (**self).write_key(out);
    }
}

impl<T: RedisKey + ?Sized> RedisKey for Arc<T> {
    fn write_key(&self, out: &mut String) {
        (**self).write_key(out);
    }
}

impl<T: RedisKey + ?Sized> RedisKey for Rc<T> {
    fn write_key(&self, out: &mut String) {
        (**self).write_key(out);
    }
}

/// Header values that are not visible ASCII are written as `~hex:` and
/// their bytes in hex, so distinct values never share a bucket.
impl RedisKey for http::HeaderValue {
    fn write_key(&self, out: &mut String) {
        match self.to_str() {
            Ok(s) => out.push_str(s),
            Err(_) => {
                out.push_str("~hex:");
                for b in self.as_bytes() {
                    let _ = write!(out, "{b:02x}");
                }
            }
        }
    }
}

macro_rules! display_keys {
    ($($t:ty),*) => {$(
        impl RedisKey for $t {
            fn write_key(&self, out: &mut String) {
                // Writing to a `String` cannot fail.
                let _ = write!(out, "{self}");
            }
        }
    )*};
}

display_keys!(
    IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, u8, u16, u32, u64, u128, usize, i8, i16, i32, i64,
    i128, isize
);

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &(impl RedisKey + ?Sized)) -> String {
        let mut s = String::from("p:");
        k.write_key(&mut s);
        s
    }

    #[test]
    fn keys_write_their_text_after_the_prefix() {
        assert_eq!(key("user-1"), "p:user-1");
        assert_eq!(key(&String::from("a")), "p:a");
        assert_eq!(key(&()), "p:global");
        assert_eq!(key(&42u64), "p:42");
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(key(&ip), "p:10.0.0.1");
        assert_eq!(key(&Arc::<str>::from("x")), "p:x");
        assert_eq!(key(&http::HeaderValue::from_static("k-1")), "p:k-1");
        let binary = http::HeaderValue::from_bytes(&[0xff, b'a']).unwrap();
        assert_eq!(key(&binary), "p:~hex:ff61");
    }
}
