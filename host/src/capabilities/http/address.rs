//! Which IP addresses an outbound request may connect to, and the DNS resolver that enforces
//! it at connect time.
//!
//! The check is made on the *resolved* addresses, by the resolver the HTTP client connects
//! through: the addresses that pass are exactly the ones the connection uses, so a name that
//! resolves to a public address when checked and to `127.0.0.1` a moment later (DNS rebinding)
//! cannot slip through — there is no second resolution. A name that resolves to any refused
//! address is refused whole: a mixed answer is a sign of trouble, not a choice to make.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// What kind of address an IP is, as far as outbound requests care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressClass {
    /// A globally routable unicast address.
    Public,
    /// `127.0.0.0/8`, `::1`.
    Loopback,
    /// RFC 1918, shared (CGNAT) `100.64.0.0/10`, link-local `169.254.0.0/16` / `fe80::/10`,
    /// unique-local `fc00::/7`, site-local `fec0::/10`: the operator's own networks and the
    /// cloud metadata address.
    Private,
    /// Unspecified, multicast, broadcast, documentation, benchmarking and reserved ranges:
    /// never a destination.
    Never,
}

/// Classifies an address. IPv6 forms that embed an IPv4 address (mapped `::ffff:a.b.c.d`,
/// compatible `::a.b.c.d`, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`) are classified by that
/// IPv4 address, so `::ffff:127.0.0.1` is loopback.
pub fn classify(ip: IpAddr) -> AddressClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> AddressClass {
    let [a, b, c, _] = ip.octets();
    if ip.is_loopback() {
        AddressClass::Loopback
    } else if ip.is_private() || ip.is_link_local() || (a == 100 && (64..128).contains(&b)) {
        AddressClass::Private
    } else if a == 0                                   // "this network", incl. 0.0.0.0
        || ip.is_multicast()                           // 224.0.0.0/4
        || a >= 240                                    // reserved 240.0.0.0/4 and broadcast
        || ip.is_documentation()                       // TEST-NET-1/2/3
        || (a == 198 && (b == 18 || b == 19))          // benchmarking 198.18.0.0/15
        || (a == 192 && b == 0 && c == 0)
    // IETF protocol assignments 192.0.0.0/24
    {
        AddressClass::Never
    } else {
        AddressClass::Public
    }
}

fn classify_v6(ip: Ipv6Addr) -> AddressClass {
    let s = ip.segments();
    if let Some(v4) = ip.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    if ip.is_loopback() {
        return AddressClass::Loopback;
    }
    if ip.is_unspecified() || ip.is_multicast() {
        return AddressClass::Never;
    }
    // IPv4-compatible ::a.b.c.d (deprecated, but some stacks still route it).
    if s[..6] == [0, 0, 0, 0, 0, 0] {
        return classify_v4(embedded_v4(s[6], s[7]));
    }
    match s[0] {
        // NAT64 well-known prefix 64:ff9b::/96.
        0x0064 if s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] => classify_v4(embedded_v4(s[6], s[7])),
        // 6to4 2002:AABB:CCDD::/48 carries IPv4 AA.BB.CC.DD.
        0x2002 => classify_v4(embedded_v4(s[1], s[2])),
        // Unique local fc00::/7, link-local fe80::/10, site-local fec0::/10.
        x if (x & 0xfe00) == 0xfc00 || (x & 0xffc0) == 0xfe80 || (x & 0xffc0) == 0xfec0 => {
            AddressClass::Private
        }
        // Documentation 2001:db8::/32, Teredo 2001::/32, ORCHID and other 2001:0::/23
        // special-purpose blocks, discard-only 100::/64.
        0x2001 if s[1] == 0x0db8 || s[1] < 0x0200 => AddressClass::Never,
        0x0100 if s[1..4] == [0, 0, 0] => AddressClass::Never,
        _ => AddressClass::Public,
    }
}

fn embedded_v4(hi: u16, lo: u16) -> Ipv4Addr {
    let [a, b] = hi.to_be_bytes();
    let [c, d] = lo.to_be_bytes();
    Ipv4Addr::new(a, b, c, d)
}

/// Which addresses a request may reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressPolicy {
    /// Public addresses only (the default for `https`).
    PublicOnly,
    /// Public, loopback and private addresses (`allow_private = true`, `https`).
    AllowPrivate,
    /// Loopback only (plain `http`, which is allowed only with `allow_private = true`).
    LoopbackOnly,
}

impl AddressPolicy {
    /// Whether `ip` may be connected to; `Err` says why not.
    pub fn check(self, ip: IpAddr) -> Result<(), AddressRefused> {
        let class = classify(ip);
        let allowed = match self {
            AddressPolicy::PublicOnly => class == AddressClass::Public,
            AddressPolicy::AllowPrivate => class != AddressClass::Never,
            AddressPolicy::LoopbackOnly => class == AddressClass::Loopback,
        };
        if allowed {
            Ok(())
        } else {
            Err(AddressRefused {
                ip,
                class,
                policy: self,
            })
        }
    }
}

/// A destination address refused by the policy: the error the resolver fails with, found
/// again by the capability in the transport error's source chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressRefused {
    /// The address.
    pub ip: IpAddr,
    /// What it is.
    pub class: AddressClass,
    /// The policy that refused it.
    pub policy: AddressPolicy,
}

impl fmt::Display for AddressRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.class {
            AddressClass::Public => "a public address",
            AddressClass::Loopback => "a loopback address",
            AddressClass::Private => "a private or link-local address",
            AddressClass::Never => "an address that is never a valid destination",
        };
        match self.policy {
            AddressPolicy::PublicOnly => write!(
                f,
                "the destination resolves to {what}; private, loopback and link-local destinations need `allow_private = true` in the handler's http grant"
            ),
            AddressPolicy::AllowPrivate => write!(f, "the destination resolves to {what}"),
            AddressPolicy::LoopbackOnly => write!(
                f,
                "plain http is allowed only to a loopback address, and the destination resolves to {what}; use https"
            ),
        }
    }
}

impl std::error::Error for AddressRefused {}

/// The resolver outbound clients connect through: system resolution (`getaddrinfo`, off the
/// async runtime), then every address checked against the policy.
#[derive(Debug)]
pub struct CheckingResolver {
    policy: AddressPolicy,
}

impl CheckingResolver {
    /// A resolver enforcing `policy`.
    pub fn new(policy: AddressPolicy) -> Self {
        CheckingResolver { policy }
    }
}

impl Resolve for CheckingResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if addrs.is_empty() {
                return Err(format!("{host} has no address").into());
            }
            for addr in &addrs {
                policy.check(addr.ip())?;
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn class(s: &str) -> AddressClass {
        classify(s.parse().unwrap())
    }

    #[test]
    fn classes() {
        use AddressClass::*;
        for (ip, expected) in [
            ("8.8.8.8", Public),
            ("1.1.1.1", Public),
            ("127.0.0.1", Loopback),
            ("127.255.0.9", Loopback),
            ("10.1.2.3", Private),
            ("172.16.0.1", Private),
            ("172.31.255.255", Private),
            ("172.32.0.1", Public),
            ("192.168.1.1", Private),
            ("169.254.169.254", Private),
            ("100.64.0.1", Private),
            ("100.128.0.1", Public),
            ("0.0.0.0", Never),
            ("0.1.2.3", Never),
            ("224.0.0.1", Never),
            ("255.255.255.255", Never),
            ("240.0.0.1", Never),
            ("192.0.2.1", Never),
            ("198.18.0.1", Never),
            ("::1", Loopback),
            ("::", Never),
            ("::ffff:127.0.0.1", Loopback),
            ("::ffff:10.0.0.1", Private),
            ("::ffff:8.8.8.8", Public),
            ("::127.0.0.1", Loopback),
            ("64:ff9b::7f00:1", Loopback),
            ("2002:7f00:1::", Loopback),
            ("2002:0808:0808::", Public),
            ("fc00::1", Private),
            ("fd12:3456::1", Private),
            ("fe80::1", Private),
            ("fec0::1", Private),
            ("ff02::1", Never),
            ("2001:db8::1", Never),
            ("2001::1", Never),
            ("2606:4700:4700::1111", Public),
        ] {
            assert_eq!(class(ip), expected, "{ip}");
        }
    }

    #[test]
    fn policies() {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let private: IpAddr = "10.0.0.1".parse().unwrap();
        let public: IpAddr = "8.8.8.8".parse().unwrap();
        let never: IpAddr = "0.0.0.0".parse().unwrap();
        assert!(AddressPolicy::PublicOnly.check(public).is_ok());
        assert!(AddressPolicy::PublicOnly.check(lo).is_err());
        assert!(AddressPolicy::PublicOnly.check(private).is_err());
        assert!(AddressPolicy::AllowPrivate.check(lo).is_ok());
        assert!(AddressPolicy::AllowPrivate.check(private).is_ok());
        assert!(AddressPolicy::AllowPrivate.check(never).is_err());
        assert!(AddressPolicy::LoopbackOnly.check(lo).is_ok());
        assert!(AddressPolicy::LoopbackOnly.check(public).is_err());
        let why = AddressPolicy::PublicOnly.check(lo).unwrap_err().to_string();
        assert!(why.contains("allow_private"), "{why}");
    }

    #[tokio::test]
    async fn the_resolver_refuses_localhost_unless_allowed() {
        let name = || -> Name { "localhost".parse().unwrap() };
        let refused = CheckingResolver::new(AddressPolicy::PublicOnly)
            .resolve(name())
            .await;
        let err = refused.err().unwrap();
        assert!(err.downcast_ref::<AddressRefused>().is_some(), "{err}");
        let allowed = CheckingResolver::new(AddressPolicy::LoopbackOnly)
            .resolve(name())
            .await
            .unwrap();
        assert!(allowed.into_iter().all(|a| a.ip().is_loopback()));
    }

    proptest! {
        /// IPv4-mapped IPv6 addresses are always judged like the IPv4 address they carry.
        #[test]
        fn mapped_addresses_match_their_v4(bits in any::<u32>()) {
            let v4 = Ipv4Addr::from(bits);
            prop_assert_eq!(classify(IpAddr::V6(v4.to_ipv6_mapped())), classify(IpAddr::V4(v4)));
        }

        /// Nothing in 127/8, 10/8 or 192.168/16 is ever public.
        #[test]
        fn private_ranges_are_never_public(b in any::<u8>(), c in any::<u8>(), d in any::<u8>()) {
            prop_assert_eq!(classify(IpAddr::V4(Ipv4Addr::new(127, b, c, d))), AddressClass::Loopback);
            prop_assert_eq!(classify(IpAddr::V4(Ipv4Addr::new(10, b, c, d))), AddressClass::Private);
            prop_assert_eq!(classify(IpAddr::V4(Ipv4Addr::new(192, 168, c, d))), AddressClass::Private);
        }
    }
}
