//! Text building for hot paths. `format!` goes through `core::fmt`'s dynamic
//! dispatch, which in a Wasm module costs more than the allocation it fills:
//! keys and header values built on every request use these instead.

/// Appends `value` in decimal.
pub fn push_u64(out: &mut String, value: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = value;
    loop {
        at -= 1;
        if let Some(digit) = digits.get_mut(at) {
            *digit = b'0' + (rest % 10) as u8;
        }
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    for &digit in digits.get(at..).unwrap_or_default() {
        out.push(char::from(digit));
    }
}

/// Appends `value` in decimal, with a `-` when negative.
pub fn push_i64(out: &mut String, value: i64) {
    if value < 0 {
        out.push('-');
    }
    push_u64(out, value.unsigned_abs());
}

/// `value` in decimal, as its own string.
pub fn decimal(value: u64) -> String {
    let mut out = String::with_capacity(20);
    push_u64(&mut out, value);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_are_what_format_writes() {
        for value in [0, 1, 9, 10, 99, 100, 12_345, u64::from(u32::MAX), u64::MAX - 1, u64::MAX] {
            assert_eq!(decimal(value), value.to_string());
        }
        for value in [0, -1, 1, -10, i64::MIN, i64::MAX] {
            let mut out = String::from("t=");
            push_i64(&mut out, value);
            assert_eq!(out, format!("t={value}"));
        }
    }
}
