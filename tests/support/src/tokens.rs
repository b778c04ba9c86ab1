//! Credentials shaped like real ones, for tests of what scrubs them.

use base64::Engine as _;

/// The `n`th of a family of JWT-like access tokens as one identity provider issues them: every
/// token shares the header and most of the claims, and differs in a few claims and the
/// signature.
pub fn access_token(n: u64) -> String {
    let url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let claims = format!(
        r#"{{"iss":"https://idp.example.com/realms/keyfactor","aud":"keyfactor-command","sub":"svc-jobhook","exp":{},"jti":"{:016x}"}}"#,
        1_700_000_000 + n,
        n.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    );
    let signature: Vec<u8> = (0..256u64)
        .map(|i| (n.wrapping_mul(2_654_435_761).wrapping_add(i * 40_503) >> 7) as u8)
        .collect();
    format!(
        "eyJhbGciOiJSUzI1NiIsImtpZCI6IjhGMzQ1QjY3ODlBQiIsInR5cCI6ImF0K2p3dCJ9.{}.{}",
        url.encode(claims),
        url.encode(signature)
    )
}
