//! What mvm prints on stdout: lines (`outln!`) that end mvm quietly when the reader went away,
//! and the one table layout of `ps` and `images`.

/// `println!` for command output: a closed stdout (`mvm ps | head -1`) ends mvm quietly instead of
/// panicking.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            $crate::output::stdout_failed(&e);
        }
    }};
}

/// Ends mvm after a write to stdout failed: silently with 0 when the reader went away (a broken
/// pipe, as other Unix tools behave), else with one line and 1.
pub fn stdout_failed(e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("mvm: cannot write to stdout: {e}");
    std::process::exit(crate::error::EXIT_FAILURE);
}

/// Rows as aligned columns, as Docker prints them: each column as wide as its widest cell,
/// columns three spaces apart, no trailing blanks. The first row is the header.
pub fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == N {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}   ", w = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_as_wide_as_their_widest_cell() {
        let rows = [
            ["A", "BB", "C"].map(String::from),
            ["aaaa", "", "c"].map(String::from),
        ];
        assert_eq!(table(&rows), "A      BB   C\naaaa        c\n");
        assert_eq!(table::<2>(&[]), "");
    }
}
