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
use std::sync::Arc;

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

/// Classifies an address.
///
/// An IPv6 address in a range that embeds an IPv4 address is judged by that IPv4 address as
/// well as by its own range, and the stricter of the two wins, so `::ffff:127.0.0.1` is
/// loopback and `2002:a00:1::` (6to4 of `10.0.0.1`) is private. The ranges, with where the
/// IPv4 address sits ([`embedded_v4`]):
///
/// | range | what | embedded IPv4 |
/// |---|---|---|
/// | `::ffff:0:0/96` | IPv4-mapped | last 32 bits |
/// | `::/96` | IPv4-compatible (deprecated) | last 32 bits |
/// | `::ffff:0:0:0/96` | SIIT IPv4-translated (RFC 2765) | last 32 bits |
/// | `64:ff9b::/96` | NAT64 well-known prefix (RFC 6052) | last 32 bits |
/// | `64:ff9b:1::/48` | NAT64 local-use (RFC 8215) | every RFC 6052 position (/48 … /96) |
/// | `2002::/16` | 6to4 | bits 16–47 |
/// | `2001::/32` | Teredo | server bits 32–63, client bits 96–127 inverted |
///
/// Where a range allows more than one position (the local-use NAT64 prefix), every reading is
/// judged and the strictest wins: such an address is public only if every reading is.
/// Teredo is never a destination whatever it embeds (the range is reserved and relays are
/// gone), but its embedded addresses are still decoded, so the rule holds for it too.
pub fn classify(ip: IpAddr) -> AddressClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => embedded_v4(v6)
            .into_iter()
            .map(classify_v4)
            .fold(classify_v6(v6), stricter),
    }
}

/// How strict a class is: what passes under fewer policies is stricter.
fn strictness(class: AddressClass) -> u8 {
    match class {
        AddressClass::Public => 0,
        AddressClass::Loopback => 1,
        AddressClass::Private => 2,
        AddressClass::Never => 3,
    }
}

fn stricter(a: AddressClass, b: AddressClass) -> AddressClass {
    if strictness(b) > strictness(a) { b } else { a }
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

/// The class of an IPv6 address by its own range only (embedded IPv4 addresses are judged by
/// [`classify`]).
fn classify_v6(ip: Ipv6Addr) -> AddressClass {
    let s = ip.segments();
    if ip.is_loopback() {
        return AddressClass::Loopback;
    }
    if ip.is_unspecified() || ip.is_multicast() {
        return AddressClass::Never;
    }
    match s[0] {
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

/// Every IPv4 address `ip` embeds, by the ranges in the table of [`classify`]; empty for an
/// address in none of them. `::` and `::1` are not IPv4-compatible addresses.
pub fn embedded_v4(ip: Ipv6Addr) -> Vec<Ipv4Addr> {
    let s = ip.segments();
    let b = ip.octets();
    let last32 = || Ipv4Addr::new(b[12], b[13], b[14], b[15]);
    let mut out = Vec::new();
    // IPv4-mapped ::ffff:0:0/96, IPv4-compatible ::/96, SIIT ::ffff:0:0:0/96.
    if s[..5] == [0; 5]
        && (s[5] == 0xffff || (s[5] == 0 && !ip.is_loopback() && !ip.is_unspecified()))
        || (s[..4] == [0; 4] && s[4] == 0xffff && s[5] == 0)
    {
        out.push(last32());
    }
    // NAT64 well-known prefix 64:ff9b::/96.
    if s[..6] == [0x0064, 0xff9b, 0, 0, 0, 0] {
        out.push(last32());
    }
    // NAT64 local-use 64:ff9b:1::/48: the operator picks a prefix of /48 or longer inside it,
    // so every RFC 6052 position from /48 on is read (bits 64–71, the "u" octet, never hold
    // address bits).
    if s[..3] == [0x0064, 0xff9b, 0x0001] {
        out.push(Ipv4Addr::new(b[6], b[7], b[9], b[10])); // /48
        out.push(Ipv4Addr::new(b[7], b[9], b[10], b[11])); // /56
        out.push(Ipv4Addr::new(b[9], b[10], b[11], b[12])); // /64
        out.push(last32()); // /96
    }
    // 6to4 2002:AABB:CCDD::/48 carries AA.BB.CC.DD.
    if s[0] == 0x2002 {
        out.push(Ipv4Addr::new(b[2], b[3], b[4], b[5]));
    }
    // Teredo 2001:0::/32: the server, and the client with every bit inverted.
    if s[..2] == [0x2001, 0] {
        out.push(Ipv4Addr::new(b[4], b[5], b[6], b[7]));
        out.push(Ipv4Addr::new(!b[12], !b[13], !b[14], !b[15]));
    }
    out
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
            // No setting reaches it: advice to change one would mislead.
            _ if self.class == AddressClass::Never => write!(
                f,
                "the destination resolves to {what} (unspecified, multicast, broadcast, \
                 documentation or reserved); no grant reaches it"
            ),
            AddressPolicy::PublicOnly => write!(
                f,
                "the destination resolves to {what}; private, loopback and link-local destinations need `allow_private = true` in the handler's http grant (`--allow-private-http` for `jobhook run`)"
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

/// Name lookups in progress at once, engine-wide. `getaddrinfo` holds a thread of the runtime's
/// blocking pool until the system resolver answers or gives up (seconds per attempt), and a
/// call dropped when its handler's time budget ends does not stop it: without a bound, a
/// handler asking for names that resolve slowly (a wildcard grant over a domain it controls)
/// could fill the blocking pool that the store's calls on the same runtime share. Past the
/// bound a lookup is refused at once; a real handler's lookups take milliseconds.
pub const MAX_LOOKUPS_IN_PROGRESS: usize = 32;

/// The engine's lookups in progress (see [`MAX_LOOKUPS_IN_PROGRESS`]).
static LOOKUPS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_LOOKUPS_IN_PROGRESS);

/// Name lookups one handler may have in progress at once, of the engine's
/// [`MAX_LOOKUPS_IN_PROGRESS`]. A lookup outlives the call that asked for it (see there), so
/// without a share of its own one handler asking for names that never resolve could hold every
/// place and make every other handler's calls fail. A handler's further lookups wait for one of
/// its own to end (within the call's timeout): only that handler slows. Eight handlers would
/// have to do this at once to fill the engine's places.
pub const MAX_LOOKUPS_PER_HANDLER: usize = 4;

/// One handler's share of the engine's name lookups ([`MAX_LOOKUPS_PER_HANDLER`]). Made with
/// the handler's http grant and cloned with it into each of its sandboxes, so every delivery of
/// the handler draws on the same share; a reload makes new ones.
#[derive(Debug, Clone)]
pub struct LookupShare(Arc<tokio::sync::Semaphore>);

impl Default for LookupShare {
    fn default() -> Self {
        LookupShare(Arc::new(tokio::sync::Semaphore::new(
            MAX_LOOKUPS_PER_HANDLER,
        )))
    }
}

/// A share is a runtime place, not configuration: grants compare by what the operator wrote.
impl PartialEq for LookupShare {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for LookupShare {}

impl LookupShare {
    /// Runs `call` (an outbound request) with its name lookups drawn on this share.
    pub async fn scope<F: std::future::Future>(&self, call: F) -> F::Output {
        HANDLER_LOOKUPS.scope(self.clone(), call).await
    }
}

#[cfg(test)]
impl LookupShare {
    /// Every place of the share, held until the permit is dropped (tests).
    pub(crate) fn take_all(&self) -> tokio::sync::OwnedSemaphorePermit {
        Arc::clone(&self.0)
            .try_acquire_many_owned(MAX_LOOKUPS_PER_HANDLER as u32)
            .expect("a share no lookup is using")
    }
}

tokio::task_local! {
    /// The share of the handler whose request is being sent ([`LookupShare::scope`]): the
    /// engine-wide client's resolver learns from it whose lookup it makes.
    static HANDLER_LOOKUPS: LookupShare;
}

/// The resolver outbound clients connect through: system resolution (`getaddrinfo`, on a
/// blocking thread, at most [`MAX_LOOKUPS_IN_PROGRESS`] at once), then every address checked
/// against the policy.
#[derive(Debug)]
pub struct CheckingResolver {
    policy: AddressPolicy,
    lookups: &'static tokio::sync::Semaphore,
}

impl CheckingResolver {
    /// A resolver enforcing `policy`.
    pub fn new(policy: AddressPolicy) -> Self {
        CheckingResolver {
            policy,
            lookups: &LOOKUPS,
        }
    }
}

impl Resolve for CheckingResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy;
        let lookups = self.lookups;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            // Read when first polled, which is in the request's task (its connect is polled
            // there before anything may move it elsewhere).
            let share = HANDLER_LOOKUPS.try_with(|share| Arc::clone(&share.0)).ok();
            // The handler's own share first: waiting there costs only this handler's call.
            let own = match share {
                Some(share) => Some(share.acquire_owned().await?),
                None => None,
            };
            let Ok(permit) = lookups.try_acquire() else {
                return Err(format!(
                    "{MAX_LOOKUPS_IN_PROGRESS} name lookups are in progress; {host} is not looked up"
                )
                .into());
            };
            let looked_up = host.clone();
            // The permits go with the blocking thread: they are given back when `getaddrinfo`
            // returns, not when this call is dropped.
            let addrs: Vec<SocketAddr> = tokio::task::spawn_blocking(move || {
                let _permits = (permit, own);
                std::net::ToSocketAddrs::to_socket_addrs(&(looked_up.as_str(), 0))
                    .map(Iterator::collect)
            })
            .await??;
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
    use std::time::Duration;

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
            // Every IPv4-embedding range, judged by what it embeds.
            ("::ffff:0:127.0.0.1", Loopback),
            ("::ffff:0:10.0.0.1", Private),
            ("::ffff:0:8.8.8.8", Public),
            ("64:ff9b::10.0.0.1", Private),
            ("64:ff9b::8.8.8.8", Public),
            // Local-use NAT64: every reading must be public, so the /96 reading of
            // 127.0.0.1 is refused even though other readings give 0.0.0.0 (never).
            ("64:ff9b:1::7f00:1", Never),
            ("64:ff9b:1:7f00:1::", Never),
            ("64:ff9b:1:0808:0808:0808:0808:0808", Public),
            ("64:ff9b:1:0808:0808:0808:0a00:0001", Private),
            ("2002:a00:1::", Private),
            ("2002:a9fe:a9fe::1", Private),
            ("2001:0:4136:e378:8000:63bf:80ff:fffe", Never),
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
        // Plain http (LoopbackOnly) is for loopback alone, even where allow_private lets https
        // reach private ranges.
        for other in [
            "10.0.0.1",
            "192.168.1.1",
            "169.254.1.1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
        ] {
            let ip: IpAddr = other.parse().unwrap();
            assert!(AddressPolicy::LoopbackOnly.check(ip).is_err(), "{other}");
        }
        assert!(
            AddressPolicy::LoopbackOnly
                .check("::1".parse().unwrap())
                .is_ok()
        );
        let why = AddressPolicy::PublicOnly.check(lo).unwrap_err().to_string();
        assert!(why.contains("allow_private"), "{why}");
        // An address no grant reaches is not told to change one.
        for never in ["0.0.0.0", "::", "224.0.0.1", "255.255.255.255", "ff02::1"] {
            let ip: IpAddr = never.parse().unwrap();
            for policy in [
                AddressPolicy::PublicOnly,
                AddressPolicy::AllowPrivate,
                AddressPolicy::LoopbackOnly,
            ] {
                let why = policy.check(ip).unwrap_err().to_string();
                assert!(
                    why.contains("no grant reaches it") && !why.contains("allow_private"),
                    "{never}: {why}"
                );
            }
        }
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

    /// Past the bound a lookup is refused at once; a permit comes back when its lookup ends,
    /// so lookups go on after one finished.
    #[tokio::test]
    async fn lookups_past_the_bound_are_refused_at_once() {
        static ONE: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);
        let resolver = CheckingResolver {
            policy: AddressPolicy::LoopbackOnly,
            lookups: &ONE,
        };
        let name = || -> Name { "localhost".parse().unwrap() };
        for _ in 0..3 {
            assert!(resolver.resolve(name()).await.is_ok());
        }
        let held = ONE.try_acquire().unwrap();
        let err = resolver.resolve(name()).await.err().unwrap().to_string();
        assert!(err.contains("name lookups are in progress"), "{err}");
        drop(held);
        assert!(resolver.resolve(name()).await.is_ok());
    }

    /// A handler whose lookups hold its share waits for one of its own to end; another
    /// handler's lookups go on meanwhile, and so do lookups outside any handler's call.
    #[tokio::test]
    async fn a_handler_past_its_share_of_lookups_waits_and_only_it_waits() {
        let resolver = CheckingResolver::new(AddressPolicy::LoopbackOnly);
        let name = || -> Name { "localhost".parse().unwrap() };
        let (busy, other) = (LookupShare::default(), LookupShare::default());
        let held = busy.take_all();
        let waiting = tokio::spawn({
            let (resolver, busy) = (
                CheckingResolver::new(AddressPolicy::LoopbackOnly),
                busy.clone(),
            );
            async move {
                busy.scope(resolver.resolve(name()))
                    .await
                    .map(|a| a.count())
            }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiting.is_finished(), "looked up past its share");
        for _ in 0..(MAX_LOOKUPS_PER_HANDLER + 1) {
            assert!(other.scope(resolver.resolve(name())).await.is_ok());
        }
        assert!(resolver.resolve(name()).await.is_ok());
        drop(held);
        let found = tokio::time::timeout(Duration::from_secs(10), waiting).await;
        assert!(found.unwrap().unwrap().unwrap() > 0);
    }

    proptest! {
        /// IPv4-mapped IPv6 addresses are always judged like the IPv4 address they carry.
        #[test]
        fn mapped_addresses_match_their_v4(bits in any::<u32>()) {
            let v4 = Ipv4Addr::from(bits);
            prop_assert_eq!(classify(IpAddr::V6(v4.to_ipv6_mapped())), classify(IpAddr::V4(v4)));
        }

        /// No IPv6 form that embeds a non-public IPv4 address is public, whatever the range.
        #[test]
        fn embedded_non_public_v4_is_never_public(net in 0usize..8, low in any::<u32>(), host in any::<u64>(), form in 0usize..10) {
            // A random address in one of the non-public IPv4 ranges.
            let (base, bits): (u32, u32) = [
                (0x7f00_0000, 8),  // 127/8
                (0x0a00_0000, 8),  // 10/8
                (0xac10_0000, 12), // 172.16/12
                (0xc0a8_0000, 16), // 192.168/16
                (0xa9fe_0000, 16), // 169.254/16
                (0x6440_0000, 10), // 100.64/10
                (0x0000_0000, 8),  // 0/8
                (0xe000_0000, 3),  // 224/3: multicast, reserved, broadcast
            ][net];
            let v4 = Ipv4Addr::from(base | (low >> bits));
            prop_assert_ne!(classify_v4(v4), AddressClass::Public);
            let o = v4.octets();
            let h = host.to_be_bytes();
            let bytes: [u8; 16] = match form {
                0 => [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, o[0], o[1], o[2], o[3]],
                1 => [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, o[0], o[1], o[2], o[3]],
                2 => [0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, o[0], o[1], o[2], o[3]],
                3 => [0, 0x64, 0xff, 0x9b, 0, 0, 0, 0, 0, 0, 0, 0, o[0], o[1], o[2], o[3]],
                4 => [0, 0x64, 0xff, 0x9b, 0, 1, h[0], h[1], h[2], 0, h[3], h[4], o[0], o[1], o[2], o[3]],
                5 => [0, 0x64, 0xff, 0x9b, 0, 1, o[0], o[1], 0, o[2], o[3], h[0], h[1], h[2], h[3], h[4]],
                6 => [0, 0x64, 0xff, 0x9b, 0, 1, h[0], h[1], 0, o[0], o[1], o[2], o[3], h[2], h[3], h[4]],
                7 => [0x20, 0x02, o[0], o[1], o[2], o[3], h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7], h[0], h[1]],
                8 => [0x20, 0x01, 0, 0, h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7], !o[0], !o[1], !o[2], !o[3]],
                _ => [0x20, 0x01, 0, 0, o[0], o[1], o[2], o[3], h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]],
            };
            let ip = Ipv6Addr::from(bytes);
            prop_assert_ne!(classify(IpAddr::V6(ip)), AddressClass::Public, "{}", ip);
            prop_assert!(AddressPolicy::PublicOnly.check(IpAddr::V6(ip)).is_err());
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
