//! What the rate-limit service's answer means for a request: plain Rust from
//! the checks we sent and the decoded response to a verdict. `overall_code`
//! decides (as in Envoy's filter); the per-descriptor statuses, when the
//! service sends one per descriptor, name the rule that denied and carry the
//! numbers for the RateLimit fields.

use gateway_common::field;

use crate::policy::{GlobalCheck, LimitStatus};
use crate::rls::{Code, DescriptorStatus, Response};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GlobalVerdict {
    Allowed {
        /// The enforced statuses, for the RateLimit fields of the response.
        statuses: Vec<LimitStatus>,
        /// Shadow rules the service would have denied.
        shadow_denied: Vec<usize>,
    },
    Denied {
        /// Every enforced rule the service said is over its limit (first: the one answered).
        rules: Vec<usize>,
        status: Option<LimitStatus>,
        retry_after_seconds: Option<u64>,
    },
    /// Not a verdict: `UNKNOWN`, or statuses that do not match what we asked.
    Invalid,
}

pub fn interpret(checks: &[GlobalCheck], response: &Response) -> GlobalVerdict {
    let statuses = &response.statuses;
    if response.overall_code == Code::Unknown || !(statuses.is_empty() || statuses.len() == checks.len()) {
        return GlobalVerdict::Invalid;
    }
    let status_of = |index: usize| statuses.get(index);
    let over = |index: usize| status_of(index).is_none_or(|status| status.code == Code::OverLimit);
    let shadow_denied: Vec<usize> = if response.overall_code == Code::OverLimit {
        checks.iter().enumerate().filter(|(index, check)| check.shadow && over(*index)).map(|(_, c)| c.rule).collect()
    } else {
        Vec::new()
    };
    let enforced = || checks.iter().enumerate().filter(|(_, check)| !check.shadow);
    if response.overall_code == Code::OverLimit {
        let mut denied: Vec<(usize, &GlobalCheck)> = enforced().filter(|(index, _)| over(*index)).collect();
        // An overall OVER_LIMIT without statuses: the first enforced rule answers.
        if statuses.is_empty() {
            denied.clear();
            denied.extend(enforced().take(1));
        }
        if let Some((index, check)) = denied.first() {
            let descriptor = status_of(*index);
            let status = descriptor.and_then(|status| limit_status(check, status));
            let retry_after_seconds =
                descriptor.and_then(|status| status.duration_until_reset).map(|reset| ceil_seconds(reset).max(1));
            return GlobalVerdict::Denied {
                rules: denied.iter().map(|(_, check)| check.rule).collect(),
                status,
                retry_after_seconds,
            };
        }
    }
    let statuses = enforced()
        .filter_map(|(index, check)| status_of(index).and_then(|status| limit_status(check, status)))
        .collect();
    GlobalVerdict::Allowed { statuses, shadow_denied }
}

/// The RateLimit fields of a descriptor status; `None` without a usable
/// `current_limit` (no limit matched, or a unit we do not know).
fn limit_status(check: &GlobalCheck, status: &DescriptorStatus) -> Option<LimitStatus> {
    let limit = status.current_limit.as_ref()?;
    let window_seconds = limit.unit_seconds?;
    if limit.requests_per_unit == 0 {
        return None;
    }
    let reset_seconds = status.duration_until_reset.map_or(window_seconds, ceil_seconds);
    let over = status.code == Code::OverLimit;
    Some(LimitStatus {
        name: limit_name(&limit.name, check),
        quota: u64::from(limit.requests_per_unit),
        window_seconds,
        remaining: if over { 0 } else { u64::from(status.limit_remaining) },
        reset_seconds,
        retry_after_seconds: if over { reset_seconds.max(1) } else { 0 },
    })
}

/// The service's name for the limit if it is safe inside a quoted header
/// string, the rule's otherwise (the name is written into RateLimit fields).
fn limit_name(name: &str, check: &GlobalCheck) -> String {
    let safe = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|byte| byte.is_ascii_alphanumeric() || b"-_./:".contains(&byte));
    if safe {
        name.to_string()
    } else {
        check.descriptor.entries.first().map(|(_, rule)| rule.clone()).unwrap_or_default()
    }
}

fn ceil_seconds(duration: std::time::Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

/// Headers the service asks us to add, checked: a lower-case token name that
/// is not a pseudo-header nor one that frames or routes the message, and a
/// valid field value. Others are left out (and counted by the caller).
pub fn checked_headers(pairs: &[(Vec<u8>, Vec<u8>)]) -> (Vec<(String, Vec<u8>)>, usize) {
    const RESERVED: [&str; 10] = [
        "content-length",
        "transfer-encoding",
        "connection",
        "upgrade",
        "keep-alive",
        "te",
        "trailer",
        "proxy-connection",
        "host",
        "content-type",
    ];
    let mut kept = Vec::new();
    let mut refused = 0;
    for (name, value) in pairs {
        let name = String::from_utf8_lossy(name).to_ascii_lowercase();
        let allowed = field::is_header_name(&name)
            && !name.starts_with(':')
            && !RESERVED.contains(&name.as_str())
            && field::is_field_value(value);
        if allowed {
            kept.push((name, value.clone()));
        } else {
            refused += 1;
        }
    }
    (kept, refused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rls::{CurrentLimit, Descriptor};
    use std::time::Duration;

    fn check(rule: usize, shadow: bool) -> GlobalCheck {
        let entries = vec![("rule".into(), format!("r{rule}"))];
        GlobalCheck { rule, descriptor: Descriptor { entries, hits_addend: None }, shadow }
    }

    fn status(code: Code, remaining: u32, reset: u64) -> DescriptorStatus {
        DescriptorStatus {
            code,
            current_limit: Some(CurrentLimit {
                name: "per-minute".into(),
                requests_per_unit: 10,
                unit_seconds: Some(60),
            }),
            limit_remaining: remaining,
            duration_until_reset: Some(Duration::from_millis(reset * 1000 - 300)),
        }
    }

    #[test]
    fn over_limit_names_the_rule_and_its_numbers() {
        let checks = [check(0, false), check(3, false)];
        let response = Response {
            overall_code: Code::OverLimit,
            statuses: vec![status(Code::Ok, 4, 30), status(Code::OverLimit, 0, 42)],
            ..Default::default()
        };
        let GlobalVerdict::Denied { rules, status, retry_after_seconds } = interpret(&checks, &response) else {
            panic!()
        };
        assert_eq!(rules, [3]);
        assert_eq!(retry_after_seconds, Some(42));
        let status = status.unwrap();
        assert_eq!((status.quota, status.window_seconds, status.remaining, status.reset_seconds), (10, 60, 0, 42));
        assert_eq!(status.name, "per-minute");
    }

    #[test]
    fn ok_carries_the_statuses_and_shadow_rules_never_deny() {
        let checks = [check(0, true), check(1, false)];
        let response = Response {
            overall_code: Code::OverLimit,
            statuses: vec![status(Code::OverLimit, 0, 5), status(Code::Ok, 7, 20)],
            ..Default::default()
        };
        let GlobalVerdict::Allowed { statuses, shadow_denied } = interpret(&checks, &response) else { panic!() };
        assert_eq!(shadow_denied, [0]);
        assert_eq!(statuses.len(), 1);
        assert_eq!((statuses[0].remaining, statuses[0].reset_seconds), (7, 20));
    }

    #[test]
    fn answers_that_are_no_verdict_are_invalid() {
        let checks = [check(0, false)];
        let unknown = Response::default();
        assert_eq!(interpret(&checks, &unknown), GlobalVerdict::Invalid);
        let mismatched = Response {
            overall_code: Code::Ok,
            statuses: vec![status(Code::Ok, 1, 1), status(Code::Ok, 1, 1)],
            ..Default::default()
        };
        assert_eq!(interpret(&checks, &mismatched), GlobalVerdict::Invalid);
        // Without statuses, OVER_LIMIT still denies (the first enforced rule), without numbers.
        let bare = Response { overall_code: Code::OverLimit, ..Default::default() };
        assert_eq!(
            interpret(&checks, &bare),
            GlobalVerdict::Denied { rules: vec![0], status: None, retry_after_seconds: None }
        );
    }

    #[test]
    fn unsafe_limit_names_fall_back_to_the_rule() {
        let mut hostile = status(Code::Ok, 1, 1);
        hostile.current_limit.as_mut().unwrap().name = "x\";r=999".into();
        let response = Response { overall_code: Code::Ok, statuses: vec![hostile], ..Default::default() };
        let GlobalVerdict::Allowed { statuses, .. } = interpret(&[check(0, false)], &response) else { panic!() };
        assert_eq!(statuses[0].name, "r0");
    }

    #[test]
    fn service_headers_are_checked() {
        let pairs = vec![
            (b"X-RLS".to_vec(), b"ok".to_vec()),
            (b"x-bad".to_vec(), b"a\r\nset-cookie: x".to_vec()),
            (b":status".to_vec(), b"200".to_vec()),
            (b"content-length".to_vec(), b"0".to_vec()),
            (b"x y".to_vec(), b"1".to_vec()),
        ];
        let (kept, refused) = checked_headers(&pairs);
        assert_eq!(kept, vec![("x-rls".to_string(), b"ok".to_vec())]);
        assert_eq!(refused, 4);
    }
}
