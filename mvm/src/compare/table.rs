//! The comparison as aligned text: a header, then one line per measurement (columns = modes,
//! then the verdict), section titles in capitals, notes at the end.

use engine::compare::Comparison;

use super::rows::{column_title, given_limits, notes, sections};

/// The whole table, ending with a newline.
pub fn render(c: &Comparison) -> String {
    let mut out = header(c);
    out.push('\n');
    let mut lines: Vec<Line> = vec![Line::Cells(
        std::iter::once(String::new())
            .chain(c.modes.iter().map(column_title))
            .chain(std::iter::once("verdict".to_string()))
            .collect(),
    )];
    for s in sections(c) {
        lines.push(Line::Title(s.title.to_uppercase()));
        for r in s.rows {
            lines.push(Line::Cells(
                std::iter::once(format!("  {}", r.label))
                    .chain(r.cells)
                    .chain(std::iter::once(r.verdict))
                    .collect(),
            ));
        }
    }
    out.push_str(&align(&lines));
    let notes = notes(c);
    if !notes.is_empty() {
        out.push_str("\nnotes:\n");
        for n in notes {
            out.push_str(&format!("  {n}\n"));
        }
    }
    out
}

/// What ran where and when.
pub fn header(c: &Comparison) -> String {
    let h = &c.host;
    format!(
        "mvm compare --image {} -- {}\nhost {}: Linux {}, {} CPUs, virtualization {}; {} UTC\n\
         every mode: {}; median of {} run{}\n",
        c.image,
        c.command.join(" "),
        h.hostname,
        h.kernel,
        h.cpus,
        h.virtualization,
        c.date,
        given_limits(c),
        c.runs,
        if c.runs == 1 { "" } else { "s" },
    )
}

enum Line {
    Title(String),
    Cells(Vec<String>),
}

/// Cells as columns as wide as their widest cell, two spaces apart; titles on lines of their own.
fn align(lines: &[Line]) -> String {
    let mut widths: Vec<usize> = Vec::new();
    for l in lines {
        if let Line::Cells(cells) = l {
            for (i, cell) in cells.iter().enumerate() {
                let w = cell.chars().count();
                match widths.get_mut(i) {
                    Some(x) => *x = (*x).max(w),
                    None => widths.push(w),
                }
            }
        }
    }
    let mut out = String::new();
    for l in lines {
        match l {
            Line::Title(t) => {
                out.push_str(t);
                out.push('\n');
            }
            Line::Cells(cells) => {
                let mut line = String::new();
                for (i, cell) in cells.iter().enumerate() {
                    line.push_str(cell);
                    if i + 1 < cells.len() {
                        let pad = widths[i] - cell.chars().count() + 2;
                        line.push_str(&" ".repeat(pad));
                    }
                }
                out.push_str(line.trim_end());
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up_under_titles_of_their_own() {
        let lines = [
            Line::Cells(vec!["".into(), "process".into(), "vm".into()]),
            Line::Title("COST".into()),
            Line::Cells(vec!["  start".into(), "1.0 ms".into(), "7.20 s".into()]),
        ];
        assert_eq!(
            align(&lines),
            "         process  vm\nCOST\n  start  1.0 ms   7.20 s\n"
        );
    }
}
