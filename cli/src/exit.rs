//! What a failure shows the user: the error chain, the flags to look at, and the
//! documented exit code — 0 ok, 1 failure, 2 usage, 3 not found, 4 incompatible
//! host, 5 integrity failure (including a chunk that does not decrypt), 6 access
//! refused (authentication, authorization, the TLS handshake, or an encrypted
//! snapshot without its tenant key).

use snapreg_client::error::ErrorKind;
use snapreg_client::ClientError;

pub const OK: i32 = 0;
pub const FAILURE: i32 = 1;

/// The documented exit code of a library error.
pub fn code(e: &ClientError) -> i32 {
    match e.kind() {
        ErrorKind::Failure => FAILURE,
        ErrorKind::Usage => 2,
        ErrorKind::NotFound => 3,
        ErrorKind::Incompatible => 4,
        ErrorKind::Integrity => 5,
        ErrorKind::AccessRefused => 6,
    }
}

/// What to do next, in snapctl's flags, appended to the library's message.
pub fn advice(e: &ClientError) -> &'static str {
    match e {
        ClientError::TreeKilled { cause } => advice(cause),
        ClientError::Unreachable { .. } => {
            "; check --registry / SNAPCTL_REGISTRY and that snapreg is running there"
        }
        ClientError::NoRegistry => ": pass --registry http://HOST:PORT or set SNAPCTL_REGISTRY",
        ClientError::Tls { .. } => {
            "; for a registry with a private CA pass it with --ca-cert or SNAPCTL_CA_CERT, and \
             where it requires client certificates pass --client-cert and --client-key"
        }
        ClientError::Incompatible(m) if m.contains("left out of the snapshot") => {
            "\n(a file the process writes was left out at checkpoint: put it back as it \
             was, checkpoint again with a higher --capture-files-limit / \
             --capture-files-total, or use --force to try anyway)"
        }
        ClientError::Incompatible(_) => "\n(use --force to try anyway)",
        _ => "",
    }
}

/// A failed command as printed: the whole chain plus the advice of the first library
/// error in it (which is last in the chain: the errors that carry advice have no
/// source), and that error's exit code (1 when there is none).
pub struct Failure {
    pub message: String,
    pub code: i32,
}

impl From<&anyhow::Error> for Failure {
    fn from(e: &anyhow::Error) -> Self {
        let client = e.chain().find_map(|c| c.downcast_ref::<ClientError>());
        Failure {
            message: format!("{e:#}{}", client.map_or("", advice)),
            code: client.map_or(FAILURE, code),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(e: ClientError, context: &str) -> Failure {
        Failure::from(&anyhow::Error::new(e).context(context.to_string()))
    }

    #[test]
    fn access_refusals_exit_6_with_the_registry_message() {
        let f = failure(
            ClientError::Auth {
                url: "http://r:5000".into(),
                message: "token x grants pull".into(),
            },
            "pushing",
        );
        assert_eq!(f.code, 6, "{}", f.message);
        assert_eq!(
            f.message,
            "pushing: access refused by http://r:5000: token x grants pull"
        );
    }

    #[test]
    fn tls_refusals_exit_6_and_name_the_certificate_flags() {
        let f = failure(
            ClientError::Tls {
                url: "https://r:5000".into(),
                reason: "invalid peer certificate: UnknownIssuer".into(),
            },
            "listing",
        );
        assert_eq!(f.code, 6);
        assert!(f.message.starts_with("listing: TLS with https://r:5000 failed: invalid peer certificate: UnknownIssuer; "), "{}", f.message);
        for flag in [
            "--ca-cert",
            "SNAPCTL_CA_CERT",
            "--client-cert",
            "--client-key",
        ] {
            assert!(f.message.contains(flag), "{}", f.message);
        }
    }

    #[test]
    fn unreachable_registries_exit_1_and_say_where_to_look() {
        let f = failure(
            ClientError::Unreachable {
                url: "http://r:5000".into(),
                reason: "connection refused".into(),
            },
            "pulling",
        );
        assert_eq!(f.code, 1);
        assert_eq!(
            f.message,
            "pulling: cannot reach the registry at http://r:5000: connection refused; check \
             --registry / SNAPCTL_REGISTRY and that snapreg is running there"
        );
    }

    #[test]
    fn documented_codes_and_advice_of_the_other_cases() {
        let cases = [
            (
                ClientError::NoRegistry,
                2,
                "no registry given: pass --registry http://HOST:PORT or set SNAPCTL_REGISTRY",
            ),
            (ClientError::Usage("bad".into()), 2, "bad"),
            (ClientError::NotFound("t/v:1".into()), 3, "not found: t/v:1"),
            (
                ClientError::Incompatible("- arch".into()),
                4,
                "this host cannot restore the snapshot:\n- arch\n(use --force to try anyway)",
            ),
            (
                ClientError::KeyRequired("needs key k".into()),
                6,
                "needs key k",
            ),
            (
                ClientError::Criu("dump failed".into()),
                1,
                "CRIU: dump failed",
            ),
        ];
        for (e, want_code, want_message) in cases {
            let f = Failure::from(&anyhow::Error::new(e));
            assert_eq!((f.code, f.message.as_str()), (want_code, want_message));
        }
    }

    #[test]
    fn errors_from_elsewhere_exit_1() {
        let f = Failure::from(&anyhow::anyhow!("stdout closed"));
        assert_eq!((f.code, f.message.as_str()), (1, "stdout closed"));
    }
}
