//! `--plot FILE.png`: the report as a picture. Every latency in the report (`connack_latency`,
//! `latency`) is drawn as a CDF on a log-scale time axis — from its CDF points when the report
//! has them (`ping`), else from its percentiles — with p50, p99 and max marked, under a title
//! with the mode and its headline figures.
//!
//! Self-contained on purpose: the picture is drawn into a palette bitmap with a built-in 5x7
//! font and written as a PNG by the `png` crate, so a user load-testing their own deployment
//! needs no plotting library, Python or fonts to get it.

use std::io;
use std::path::Path;

use serde_json::Value;

const W: usize = 1000;
const H: usize = 540;
const LEFT: usize = 80;
const RIGHT: usize = 30;
const TOP: usize = 70;
const BOTTOM: usize = 60;

/// The palette: background, text, grid, axis, then one colour per curve.
const PALETTE: [[u8; 3]; 10] = [
    [255, 255, 255],
    [30, 35, 48],
    [226, 230, 236],
    [120, 128, 140],
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
];
const BG: u8 = 0;
const INK: u8 = 1;
const GRID: u8 = 2;
const AXIS: u8 = 3;
const FIRST_CURVE: u8 = 4;

/// One latency of the report: its name and its CDF points (microseconds, fraction).
struct Curve {
    name: String,
    points: Vec<(f64, f64)>,
    marks: Vec<(&'static str, f64, f64)>,
}

/// Draws `report` and writes it to `path` as a PNG.
pub fn write(report: &Value, path: &Path) -> io::Result<()> {
    std::fs::write(path, png(&draw(report)))
}

/// Every object with percentiles in `v`, depth first, named by its key path.
fn curves(v: &Value, path: &str, out: &mut Vec<Curve>) {
    let Value::Object(map) = v else { return };
    if let (Some(p50), Some(max)) =
        (map.get("p50_us").and_then(Value::as_f64), map.get("max_us").and_then(Value::as_f64))
    {
        let get = |k: &str| map.get(k).and_then(Value::as_f64).unwrap_or(p50);
        let mut points: Vec<(f64, f64)> = map
            .get("cdf")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|p| Some((p.get(0)?.as_f64()?, p.get(1)?.as_f64()?))).collect())
            .unwrap_or_default();
        if points.len() < 2 {
            points = vec![
                (get("min_us"), 0.0),
                (p50, 0.5),
                (get("p90_us"), 0.9),
                (get("p99_us"), 0.99),
                (get("p999_us"), 0.999),
                (max, 1.0),
            ];
        }
        let count = map.get("count").and_then(Value::as_u64).unwrap_or(0);
        out.push(Curve {
            name: format!("{path} (n={count})"),
            points,
            marks: vec![("p50", p50, 0.5), ("p99", get("p99_us"), 0.99), ("max", max, 1.0)],
        });
        return;
    }
    for (k, v) in map {
        let name = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
        curves(v, &name, out);
    }
}

/// The title (the mode) and the report's headline numbers.
fn title(report: &Value) -> (String, String) {
    let mode = report.get("mode").and_then(Value::as_str).unwrap_or("report");
    let mut parts = Vec::new();
    for key in ["sessions_per_s", "mb_per_s", "sessions_ok", "held", "failed", "duration_s", "generator_cpu"] {
        if let Some(v) = report.get(key).filter(|v| v.is_number()) {
            parts.push(format!("{key} {v}"));
        }
    }
    (format!("harbormaster-bench {mode}"), parts.join("   "))
}

fn draw(report: &Value) -> Canvas {
    let mut c = Canvas::new(W, H);
    let (head, figures) = title(report);
    c.text(LEFT, 12, &head, INK, 2);
    c.text(LEFT, 34, &figures, INK, 1);
    let mut list = Vec::new();
    curves(report, "", &mut list);
    let (x0, x1, y0, y1) = (LEFT, W - RIGHT, TOP, H - BOTTOM);
    if list.is_empty() {
        c.text(LEFT, H / 2, "no latencies in this report", INK, 2);
        return c;
    }
    // Decades of microseconds that hold every point.
    let all = list.iter().flat_map(|cv| cv.points.iter().map(|p| p.0.max(0.1)));
    let (lo, hi) = all.fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(x), hi.max(x)));
    let d0 = lo.log10().floor() as i32;
    let d1 = (hi.log10().ceil() as i32).max(d0 + 1);
    let xpos = |us: f64| x0 as f64 + (us.max(0.1).log10() - d0 as f64) / (d1 - d0) as f64 * (x1 - x0) as f64;
    let ypos = |q: f64| y1 as f64 - q * (y1 - y0) as f64;

    for d in d0..=d1 {
        let x = xpos(10f64.powi(d)) as usize;
        c.line(x as i64, y0 as i64, x as i64, y1 as i64, GRID);
        let label = duration_label(10f64.powi(d));
        c.text(x.saturating_sub(label.len() * 6 / 2).min(W - label.len() * 6 - 2), y1 + 8, &label, INK, 1);
    }
    for q in [0.0, 0.25, 0.5, 0.75, 0.9, 1.0] {
        let y = ypos(q) as usize;
        c.line(x0 as i64, y as i64, x1 as i64, y as i64, GRID);
        let label = format!("{}", q);
        c.text(x0 - 8 - label.len() * 6, y - 3, &label, INK, 1);
    }
    c.line(x0 as i64, y0 as i64, x0 as i64, y1 as i64, AXIS);
    c.line(x0 as i64, y1 as i64, x1 as i64, y1 as i64, AXIS);
    c.text((x0 + x1) / 2 - 120, H - 22, "latency (log scale)", INK, 2);
    c.text(8, TOP - 14, "fraction of samples", INK, 1);

    for (i, cv) in list.iter().enumerate() {
        let colour = FIRST_CURVE + (i % (PALETTE.len() - FIRST_CURVE as usize)) as u8;
        for w in cv.points.windows(2) {
            let (a, b) = ((xpos(w[0].0), ypos(w[0].1)), (xpos(w[1].0), ypos(w[1].1)));
            for off in 0..2 {
                c.line(a.0 as i64, a.1 as i64 + off, b.0 as i64, b.1 as i64 + off, colour);
            }
        }
        for (name, us, q) in &cv.marks {
            let (x, y) = (xpos(*us) as i64, ypos(*q) as i64);
            c.fill(x - 3, y - 3, 7, 7, colour);
            c.text(
                x as usize + 6,
                (y as usize).saturating_sub(10),
                &format!("{name} {}", duration_label(*us)),
                colour,
                1,
            );
        }
        // The legend, top left inside the plot.
        let ly = y0 + 8 + i * 14;
        c.fill(x0 as i64 + 10, ly as i64 + 2, 14, 4, colour);
        c.text(x0 + 30, ly, &cv.name, INK, 1);
    }
    c
}

/// `850µs`, `12.5ms`, `2s`.
fn duration_label(us: f64) -> String {
    let (v, unit) = if us >= 1e6 {
        (us / 1e6, "s")
    } else if us >= 1e3 {
        (us / 1e3, "ms")
    } else {
        (us, "us")
    };
    let v = if v >= 100.0 || v.fract() == 0.0 { format!("{v:.0}") } else { format!("{v:.1}") };
    format!("{v}{unit}")
}

/// A palette bitmap.
struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Canvas {
        Canvas { w, h, px: vec![BG; w * h] }
    }

    fn set(&mut self, x: i64, y: i64, c: u8) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            self.px[y as usize * self.w + x as usize] = c;
        }
    }

    fn fill(&mut self, x: i64, y: i64, w: i64, h: i64, c: u8) {
        for yy in y..y + h {
            for xx in x..x + w {
                self.set(xx, yy, c);
            }
        }
    }

    /// Bresenham.
    fn line(&mut self, mut x0: i64, mut y0: i64, x1: i64, y1: i64, c: u8) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let mut err = dx + dy;
        loop {
            self.set(x0, y0, c);
            if x0 == x1 && y0 == y1 {
                return;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x0 += sx;
            }
            if e2 <= dx {
                err += dx;
                y0 += sy;
            }
        }
    }

    /// Text in the 5x7 font, `scale` pixels per font pixel, 6 per character at scale 1.
    fn text(&mut self, x: usize, y: usize, s: &str, c: u8, scale: usize) {
        for (i, ch) in s.chars().enumerate() {
            let rows = glyph(ch);
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        let (px, py) = (x + (i * 6 + col) * scale, y + r * scale);
                        self.fill(px as i64, py as i64, scale as i64, scale as i64, c);
                    }
                }
            }
        }
    }
}

/// The rows (5 bits each, left = 0x10) of a character; lower case is drawn as upper case,
/// anything else as a box.
fn glyph(ch: char) -> [u8; 7] {
    match ch.to_ascii_uppercase() {
        ' ' => [0, 0, 0, 0, 0, 0, 0],
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        '.' => [0, 0, 0, 0, 0, 0x0C, 0x0C],
        ',' => [0, 0, 0, 0, 0x0C, 0x04, 0x08],
        ':' => [0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0],
        '-' => [0, 0, 0, 0x1F, 0, 0, 0],
        '_' => [0, 0, 0, 0, 0, 0, 0x1F],
        '=' => [0, 0, 0x1F, 0, 0x1F, 0, 0],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '/' => [0, 0x01, 0x02, 0x04, 0x08, 0x10, 0],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        _ => [0x1F, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1F],
    }
}

/// The canvas as a PNG: 8-bit palette (the `png` crate does the filtering, deflate and
/// checksums).
fn png(c: &Canvas) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, c.w as u32, c.h as u32);
    enc.set_color(png::ColorType::Indexed);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_palette(PALETTE.concat());
    let written = enc.write_header().and_then(|mut w| w.write_image_data(&c.px));
    // Only a canvas whose size disagrees with its pixels can fail: not one `Canvas::new` made.
    written.expect("a canvas encodes as a PNG");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_report_becomes_a_png() {
        let report = json!({
            "mode": "storm", "sessions_per_s": 5234.5,
            "connack_latency": { "count": 1000, "min_us": 80.0, "p50_us": 120.0, "p90_us": 300.0, "p99_us": 900.0,
                                 "p999_us": 2000.0, "max_us": 4000.0, "cdf": [] },
        });
        let png = png(&draw(&report));
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
        assert!(png.ends_with(&[0, 0, 0, 0, b'I', b'E', b'N', b'D', 0xAE, 0x42, 0x60, 0x82]));
        // A chart of flat colours compresses well below its raw size.
        assert!(png.len() < W * H / 5, "{} bytes", png.len());
    }

    #[test]
    fn the_png_decodes_to_the_canvas() {
        let report = json!({ "mode": "ping", "latency": { "count": 10, "min_us": 50.0, "p50_us": 60.0,
                             "p99_us": 90.0, "max_us": 95.0, "cdf": [] } });
        let canvas = draw(&report);
        let png = png(&canvas);
        let mut reader = png::Decoder::new(std::io::Cursor::new(png)).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width as usize, info.height as usize), (canvas.w, canvas.h));
        assert_eq!(&buf[..info.buffer_size()], &canvas.px[..]);
    }

    #[test]
    fn labels() {
        assert_eq!(duration_label(850.0), "850us");
        assert_eq!(duration_label(12_500.0), "12.5ms");
        assert_eq!(duration_label(2e6), "2s");
    }
}
