//! The service error type and the one table mapping error kinds to HTTP statuses.

use std::fmt;

/// What went wrong, independent of transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidArgument,
    Unauthorized,
    Forbidden,
    NotFound,
    AlreadyExists,
    /// The request conflicts with the resource's state (e.g. cancel after acknowledgement).
    Conflict,
    /// An `If-Match` precondition did not hold.
    PreconditionFailed,
    /// A bounded server resource is exhausted; retry later.
    Unavailable,
    /// The client did not send the request (body) in time.
    RequestTimeout,
    /// The request body is larger than the server accepts.
    PayloadTooLarge,
    /// The request body is not in a media type the call accepts (e.g. no JSON content type).
    UnsupportedMediaType,
    /// The caller is throttled (e.g. too many failed logins); retry later.
    TooManyRequests,
    Internal,
}

impl ErrorKind {
    pub fn http_status(self) -> u16 {
        match self {
            ErrorKind::InvalidArgument => 400,
            ErrorKind::Unauthorized => 401,
            ErrorKind::Forbidden => 403,
            ErrorKind::NotFound => 404,
            ErrorKind::AlreadyExists => 409,
            ErrorKind::Conflict => 409,
            ErrorKind::PreconditionFailed => 412,
            ErrorKind::Unavailable => 503,
            ErrorKind::RequestTimeout => 408,
            ErrorKind::PayloadTooLarge => 413,
            ErrorKind::UnsupportedMediaType => 415,
            ErrorKind::TooManyRequests => 429,
            ErrorKind::Internal => 500,
        }
    }
}

/// An error a service operation returns: a kind, a stable machine code and a human message.
#[derive(Debug, Clone)]
pub struct ServiceError {
    pub kind: ErrorKind,
    pub code: &'static str,
    pub message: String,
}

impl ServiceError {
    pub fn new(kind: ErrorKind, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind,
            code,
            message: message.into(),
        }
    }

    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, code, message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, code, message)
    }

    /// An internal failure. The backend's text goes only to the server log, with a random id;
    /// the client gets the code `internal` and that id, never the text.
    pub fn internal(message: impl fmt::Display) -> Self {
        let error_id = log_id();
        tracing::error!(error_id = %error_id, error = %message, "internal error");
        Self::new(
            ErrorKind::Internal,
            "internal",
            format!("internal error; see server log, id {error_id}"),
        )
    }

    /// The store cannot take the operation now (disk full, I/O error, busy): 503 with the stable
    /// code `storage_unavailable`; the backend's text goes to the log with an id, as for
    /// [`ServiceError::internal`].
    pub fn storage_unavailable(message: impl fmt::Display) -> Self {
        let error_id = log_id();
        tracing::warn!(error_id = %error_id, error = %message, "storage unavailable");
        Self::new(
            ErrorKind::Unavailable,
            "storage_unavailable",
            format!("storage unavailable; retry later (server log id {error_id})"),
        )
    }
}

/// A random id that ties an error answer to its server log line (16 hex digits).
fn log_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

impl fmt::Display for ServiceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for ServiceError {}

impl From<mooring_store::StoreError> for ServiceError {
    fn from(e: mooring_store::StoreError) -> Self {
        match e {
            mooring_store::StoreError::AlreadyExists(m) => {
                Self::new(ErrorKind::AlreadyExists, "already_exists", m)
            }
            mooring_store::StoreError::NotFound(m) => Self::not_found("not_found", m),
            mooring_store::StoreError::Unavailable(m) => Self::storage_unavailable(m),
            other => Self::internal(other),
        }
    }
}

pub type ServiceResult<T> = Result<T, ServiceError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_error_hides_backend_text_behind_an_id() {
        let e = ServiceError::internal("disk I/O error at /var/lib/mooring/mooring.db");
        assert_eq!(e.kind, ErrorKind::Internal);
        assert_eq!(e.code, "internal");
        assert!(!e.message.contains("disk"), "{}", e.message);
        let id = e
            .message
            .strip_prefix("internal error; see server log, id ")
            .expect("message names the log id");
        assert_eq!(id.len(), 16);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
    }
}
