//! A miss-ratio chart as SVG: miss ratio against cache size (log scale),
//! one line per policy. Hand-written SVG keeps the dependency list short.

use std::fmt::Write;

/// One policy's points: `(cache size in objects, miss ratio)`.
pub struct Series {
    /// Legend label.
    pub label: String,
    /// Points in increasing size.
    pub points: Vec<(u64, f64)>,
}

const COLORS: [&str; 12] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#000000", "#aec7e8",
];

/// Renders `series` as an SVG document titled `title`.
pub fn svg(title: &str, series: &[Series]) -> String {
    let (w, h) = (760.0, 480.0);
    let (left, right, top, bottom) = (70.0, 170.0, 40.0, 60.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let sizes = series.iter().flat_map(|s| s.points.iter().map(|p| p.0)).filter(|&s| s > 0);
    let (min_x, max_x) = sizes.fold((u64::MAX, 0), |(lo, hi), s| (lo.min(s), hi.max(s)));
    let (lx0, lx1) =
        ((min_x.max(1) as f64).log10(), (max_x.max(2) as f64).log10().max((min_x.max(1) as f64).log10() + 1e-9));
    let x = |size: u64| left + ((size.max(1) as f64).log10() - lx0) / (lx1 - lx0) * pw;
    let y = |ratio: f64| top + (1.0 - ratio.clamp(0.0, 1.0)) * ph;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>"#,
        left + pw / 2.0,
        escape(title)
    );
    for tick in 0..=10 {
        let ratio = tick as f64 / 10.0;
        let ty = y(ratio);
        let _ = writeln!(out, r##"<line x1="{left}" y1="{ty}" x2="{}" y2="{ty}" stroke="#e5e5e5"/>"##, left + pw);
        let _ = writeln!(out, r#"<text x="{}" y="{}" text-anchor="end">{ratio:.1}</text>"#, left - 6.0, ty + 4.0);
    }
    let mut decade = 10f64.powf(lx0.floor());
    while decade <= 10f64.powf(lx1) * 1.0001 {
        if decade >= 10f64.powf(lx0) * 0.9999 {
            let tx = x(decade as u64);
            let _ = writeln!(out, r##"<line x1="{tx}" y1="{top}" x2="{tx}" y2="{}" stroke="#e5e5e5"/>"##, top + ph);
            let _ = writeln!(
                out,
                r#"<text x="{tx}" y="{}" text-anchor="middle">{}</text>"#,
                top + ph + 18.0,
                decade as u64
            );
        }
        decade *= 10.0;
    }
    let _ = writeln!(out, r#"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">cache size (objects, log scale)</text>"#,
        left + pw / 2.0,
        h - 15.0
    );
    let _ = writeln!(
        out,
        r#"<text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {})">miss ratio</text>"#,
        top + ph / 2.0,
        top + ph / 2.0
    );
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = s.points.iter().map(|&(size, r)| format!("{:.1},{:.1}", x(size), y(r))).collect();
        let _ =
            writeln!(out, r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#, path.join(" "));
        for &(size, r) in &s.points {
            let _ = writeln!(out, r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#, x(size), y(r));
        }
        let ly = top + 14.0 + i as f64 * 18.0;
        let lx = left + pw + 15.0;
        let _ = writeln!(
            out,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="2"/>"#,
            lx + 22.0
        );
        let _ = writeln!(out, r#"<text x="{}" y="{}">{}</text>"#, lx + 28.0, ly + 4.0, escape(&s.label));
    }
    out.push_str("</svg>\n");
    out
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_one_line_per_policy() {
        let series = vec![
            Series { label: "lru".into(), points: vec![(10, 0.9), (100, 0.5), (1000, 0.2)] },
            Series { label: "s3fifo <best>".into(), points: vec![(10, 0.8), (100, 0.4), (1000, 0.1)] },
        ];
        let doc = svg("trace", &series);
        assert!(doc.starts_with("<svg") && doc.ends_with("</svg>\n"));
        assert_eq!(doc.matches("<polyline").count(), 2);
        assert_eq!(doc.matches("<circle").count(), 6);
        assert!(doc.contains("s3fifo &lt;best&gt;"));
    }
}
