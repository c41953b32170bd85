//! One request on an admitted connection: its path made canonical (what is matched is what
//! the application receives), its JWT verified where RequestAuthentication applies, then
//! authorization with the request's attributes.

use std::borrow::Cow;

use http::{Uri, header, request::Parts};

use super::{
    Admission,
    normalize::{self, PathError},
};
use crate::policy::{Denied, HttpRequest, Permit};

/// The request may go on; it was edited as the policies say (canonical path, token
/// removed unless forwarded, JWT payload header).
#[derive(Debug)]
pub struct RequestPermit(pub Permit);

/// Why a request is answered by the proxy instead of the application.
#[derive(Debug, thiserror::Error)]
pub enum RequestDenied {
    #[error("bad request: {0}")]
    BadPath(#[from] PathError),
    #[error("{}", .0.verdict().reason)]
    Denied(Denied),
}

impl RequestDenied {
    /// 400 for a malformed request, 401 for a rejected JWT, 403 for a policy denial.
    pub fn status(&self) -> http::StatusCode {
        match self {
            Self::BadPath(_) => http::StatusCode::BAD_REQUEST,
            Self::Denied(denied) => http::StatusCode::from_u16(denied.http_status())
                .unwrap_or(http::StatusCode::FORBIDDEN),
        }
    }
}

impl Admission {
    /// Decides one request, editing `parts` into what the application will receive.
    pub fn authorize_request(&self, parts: &mut Parts) -> Result<RequestPermit, RequestDenied> {
        normalize_uri(&mut parts.uri)?;
        let jwt = self
            .policies
            .authenticate_request(parts)
            .map_err(RequestDenied::Denied)?;
        let host = parts
            .uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| {
                parts
                    .headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .unwrap_or_default();
        // A value that is not UTF-8 is matched in its lossy form, so that presence and
        // DENY rules still see the header.
        let values: Vec<(&str, Cow<'_, str>)> = parts
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), String::from_utf8_lossy(v.as_bytes())))
            .collect();
        let headers: Vec<(&str, &str)> = values.iter().map(|(k, v)| (*k, v.as_ref())).collect();
        let request = HttpRequest {
            method: parts.method.as_str(),
            path: parts.uri.path(),
            host,
            headers: &headers,
            jwt: jwt.as_ref(),
        };
        self.policies
            .authorize(&self.context(Some(request)))
            .map(RequestPermit)
            .map_err(RequestDenied::Denied)
    }
}

/// Replaces the path of `uri` with its normalized form ([`normalize::normalize_path`]),
/// keeping its scheme, authority and query.
fn normalize_uri(uri: &mut Uri) -> Result<(), PathError> {
    let target = uri.path_and_query().map_or("/", |p| p.as_str());
    let normalized = normalize::normalize_path(target)?;
    if normalized.path_and_query() == target {
        return Ok(());
    }
    // A normalized target only has bytes the original had, and `/`, so rebuilding cannot
    // fail; if it ever did, the request is refused rather than matched un-normalized.
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = normalized.path_and_query().parse().ok();
    *uri = Uri::from_parts(parts).map_err(|_| PathError::NotOriginForm)?;
    Ok(())
}
