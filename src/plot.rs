//! The demo's timeline chart, drawn as SVG with `plotters`.

use std::path::Path;
use std::time::Duration;

use plotters::prelude::*;

/// One line of the chart: requests per second over time.
#[derive(Debug, Clone)]
pub struct RateSeries {
    /// Legend label.
    pub label: String,
    /// When each event happened, from the run's start.
    pub events: Vec<Duration>,
}

/// A named span of the run (a phase of the upstream's script).
#[derive(Debug, Clone)]
pub struct Band {
    /// Label drawn at the top of the span.
    pub label: String,
    /// Start of the span.
    pub start: Duration,
    /// End of the span.
    pub end: Duration,
}

/// Buckets `events` into rates per second over `[0, total)` in steps of `step`.
pub fn rates(events: &[Duration], total: Duration, step: Duration) -> Vec<(f64, f64)> {
    let step_s = step.as_secs_f64().max(1e-3);
    let n = (total.as_secs_f64() / step_s).ceil() as usize;
    let mut counts = vec![0u32; n.max(1)];
    for e in events {
        let i = (e.as_secs_f64() / step_s) as usize;
        if i < counts.len() {
            counts[i] += 1;
        }
    }
    counts
        .iter()
        .enumerate()
        .map(|(i, c)| (i as f64 * step_s, f64::from(*c) / step_s))
        .collect()
}

/// Draws the request rates and, below them, the breaker's state over time
/// (0 closed, 1 half-open, 2 open), with the phases as labelled bands.
pub fn draw_timeline(
    path: &Path,
    total: Duration,
    series: &[RateSeries],
    bands: &[Band],
    breaker: &[(Duration, u8)],
    limit_per_sec: f64,
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1100, 620)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(460);
    let step = Duration::from_millis(250);
    let x_max = total.as_secs_f64();
    let lines: Vec<_> = series
        .iter()
        .map(|s| rates(&s.events, total, step))
        .collect();
    let y_max = lines
        .iter()
        .flatten()
        .map(|p| p.1)
        .fold(limit_per_sec * 1.5, f64::max)
        * 1.1;

    let mut chart = ChartBuilder::on(&top)
        .caption(
            "apiguard demo: requests reaching the upstream",
            ("sans-serif", 20),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("requests / s")
        .draw()?;
    for (i, band) in bands.iter().enumerate() {
        let shade = if i % 2 == 0 {
            RGBColor(245, 245, 245)
        } else {
            WHITE
        };
        chart.draw_series(std::iter::once(Rectangle::new(
            [
                (band.start.as_secs_f64(), 0.0),
                (band.end.as_secs_f64(), y_max),
            ],
            shade.filled(),
        )))?;
        chart.draw_series(std::iter::once(Text::new(
            band.label.clone(),
            (band.start.as_secs_f64() + 0.1, y_max * 0.97),
            ("sans-serif", 13),
        )))?;
    }
    chart
        .draw_series(LineSeries::new(
            [(0.0, limit_per_sec), (x_max, limit_per_sec)],
            BLACK.stroke_width(1),
        ))?
        .label("upstream's limit while it rate limits")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK));
    let palette = [RED, BLUE, GREEN, MAGENTA];
    for (i, (s, points)) in series.iter().zip(&lines).enumerate() {
        let color = palette[i % palette.len()];
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(s.label.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;

    let mut states = ChartBuilder::on(&bottom)
        .caption(
            "guarded client's breaker (0 closed, 1 half-open, 2 open)",
            ("sans-serif", 15),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..x_max, -0.2f64..2.2f64)?;
    states.configure_mesh().y_labels(3).draw()?;
    let mut steps = vec![(0.0, 0.0)];
    let mut last = 0.0;
    for (t, s) in breaker {
        let x = t.as_secs_f64();
        steps.push((x, last));
        last = f64::from(*s);
        steps.push((x, last));
    }
    steps.push((x_max, last));
    states.draw_series(LineSeries::new(steps, RED.stroke_width(2)))?;
    root.present()?;
    Ok(())
}
