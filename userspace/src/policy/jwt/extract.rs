//! Where a rule's token lives in a request and how it is taken out before forwarding,
//! as Envoy's `jwt_authn` (Istio's data plane) does it: a rule reads `fromHeaders` (name,
//! optional value prefix), then `fromParams`, then `fromCookies`, or, when it names none,
//! `Authorization: Bearer` and the `access_token` query parameter. A header token is
//! removed by removing the whole header; a query parameter or cookie token is left in
//! place, because Envoy never removes those (its `removeJwt` for them is a no-op) and
//! rewriting the path would change what the application and path rules see compared
//! with Istio.

use std::fmt;

use http::{HeaderMap, request::Parts};

use super::{super::model::JwtRule, RequestAuthn};

const DEFAULT_HEADER: &str = "authorization";
const DEFAULT_PREFIX: &str = "Bearer ";
const DEFAULT_PARAM: &str = "access_token";

/// One place a rule looks for its token.
#[derive(Clone, Copy, Debug)]
pub(super) enum Location<'r> {
    /// A header (matched without regard to case) whose value starts with `prefix`.
    Header { name: &'r str, prefix: &'r str },
    /// A query parameter, compared exactly.
    Param(&'r str),
    /// A cookie of the `Cookie` header, compared exactly.
    Cookie(&'r str),
}

impl fmt::Display for Location<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Header { name, .. } => write!(f, "header {name}"),
            Self::Param(name) => write!(f, "query parameter {name}"),
            Self::Cookie(name) => write!(f, "cookie {name}"),
        }
    }
}

impl PartialEq for Location<'_> {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Header { name: a, prefix: p }, Self::Header { name: b, prefix: q }) => {
                a.eq_ignore_ascii_case(b) && p == q
            }
            (Self::Param(a), Self::Param(b)) | (Self::Cookie(a), Self::Cookie(b)) => a == b,
            _ => false,
        }
    }
}

impl<'r> Location<'r> {
    /// The rule's locations, in the order they are searched.
    pub(super) fn of(rule: &'r JwtRule) -> Vec<Self> {
        if rule.from_headers.is_empty()
            && rule.from_params.is_empty()
            && rule.from_cookies.is_empty()
        {
            return vec![
                Self::Header {
                    name: DEFAULT_HEADER,
                    prefix: DEFAULT_PREFIX,
                },
                Self::Param(DEFAULT_PARAM),
            ];
        }
        let headers = rule.from_headers.iter().map(|h| Self::Header {
            name: &h.name,
            prefix: h.prefix.as_deref().unwrap_or(""),
        });
        let params = rule.from_params.iter().map(|p| Self::Param(p));
        let cookies = rule.from_cookies.iter().map(|c| Self::Cookie(c));
        headers.chain(params).chain(cookies).collect()
    }

    /// The token in one header, if this location reads it (a cookie location reads
    /// `Cookie` headers). An empty value holds no token.
    fn in_header<'v>(&self, name: &str, value: &'v str) -> Option<&'v str> {
        match self {
            Self::Header { name: want, prefix } if want.eq_ignore_ascii_case(name) => {
                value.strip_prefix(prefix).filter(|t| !t.is_empty())
            }
            Self::Cookie(want) if name.eq_ignore_ascii_case("cookie") => {
                value.split(';').find_map(|pair| {
                    let (k, v) = pair.trim().split_once('=')?;
                    (k == *want && !v.is_empty()).then_some(v)
                })
            }
            _ => None,
        }
    }

    /// The token in a query string, if this location reads it.
    fn in_query<'q>(&self, query: &'q str) -> Option<&'q str> {
        let Self::Param(want) = self else { return None };
        query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            (k == *want && !v.is_empty()).then_some(v)
        })
    }

    fn in_request(&self, parts: &Parts) -> Option<String> {
        let name = match self {
            Self::Header { name, .. } => name,
            Self::Cookie(_) => "cookie",
            Self::Param(_) => return self.in_query(parts.uri.query()?).map(str::to_owned),
        };
        parts
            .headers
            .get_all(name)
            .iter()
            // A value that is not UTF-8 cannot hold a JWT.
            .filter_map(|v| v.to_str().ok())
            .find_map(|v| self.in_header(name, v))
            .map(str::to_owned)
    }

    /// Takes the token out of the request before forwarding (see the module doc for why
    /// a query parameter or cookie stays).
    pub(super) fn remove(&self, headers: &mut HeaderMap) {
        if let Self::Header { name, .. } = self {
            headers.remove(*name);
        }
    }
}

/// A token found in a request and where it was.
pub(super) struct Found<'r> {
    pub token: String,
    pub location: Location<'r>,
}

/// The first token in the request, searching rule by rule in policy order.
pub(super) fn find_in_request<'r>(
    policies: &'r [RequestAuthn],
    parts: &Parts,
) -> Option<Found<'r>> {
    rules(policies).flat_map(Location::of).find_map(|location| {
        let token = location.in_request(parts)?;
        Some(Found { token, location })
    })
}

fn rules(policies: &[RequestAuthn]) -> impl Iterator<Item = &JwtRule> {
    policies.iter().flat_map(|p| &p.spec.jwt_rules)
}
