//! Per-inference record exports: CSV, JSONL and Parquet (readable by pandas/pyarrow).

use super::csv_field;
use crate::store::{ResultRow, Store, StoreError};
use parquet::basic::Compression;
use parquet::data_type::{BoolType, ByteArray, ByteArrayType, FloatType, Int32Type, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use std::io::Write;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Csv,
    Jsonl,
    Parquet,
}

impl Format {
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "csv" => Some(Format::Csv),
            "jsonl" => Some(Format::Jsonl),
            "parquet" => Some(Format::Parquet),
            _ => None,
        }
    }
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Csv => "text/csv",
            Format::Jsonl => "application/x-ndjson",
            Format::Parquet => "application/vnd.apache.parquet",
        }
    }
}

const CSV_HEADER: &str = "campaign_id,trial_id,attempt,input,board,outcome,failure,mismatched_pixels,nonfinite,iou_vs_golden,iou_vs_truth,golden_iou_vs_truth,latency_ns,power_w,vccint_mv,temp_c,start_unix_ns,stratum,model,layer,tensor_kind,bit,voltages\n";

const SCHEMA: &str = "message record {
  required int64 campaign_id;
  required int64 trial_id;
  required int32 attempt;
  required int32 input;
  required binary board (UTF8);
  required binary outcome (UTF8);
  required boolean failure;
  required int32 mismatched_pixels;
  required int32 nonfinite;
  required float iou_vs_golden;
  required float iou_vs_truth;
  required float golden_iou_vs_truth;
  required int64 latency_ns;
  required float power_w;
  required float vccint_mv;
  required float temp_c;
  required int64 start_unix_ns;
  required int32 stratum;
  required binary model (UTF8);
  required binary layer (UTF8);
  required binary tensor_kind (UTF8);
  required int32 bit;
  required binary voltages (UTF8);
}";

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("writing the export: {0}")]
    Io(#[from] std::io::Error),
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
}

/// Writes every stored record of `campaign` to `out` in `format`; returns rows written.
pub fn export<W: Write + Send>(
    store: &Store,
    campaign: u64,
    format: Format,
    out: W,
) -> Result<u64, ExportError> {
    match format {
        Format::Csv => {
            let mut out = std::io::BufWriter::new(out);
            out.write_all(CSV_HEADER.as_bytes())?;
            let mut n = 0;
            let mut io_err = None;
            store
                .for_each_result(campaign, |r| {
                    let line = format!(
                        "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
                        r.campaign_id,
                        r.trial_id,
                        r.attempt,
                        r.input,
                        csv_field(&r.board),
                        r.outcome,
                        r.failure,
                        r.mismatched_pixels,
                        r.nonfinite,
                        r.iou_vs_golden,
                        r.iou_vs_truth,
                        r.golden_iou_vs_truth,
                        r.latency_ns,
                        r.power_w,
                        r.vccint_mv,
                        r.temp_c,
                        r.start_unix_ns,
                        r.stratum,
                        csv_field(&r.model),
                        csv_field(&r.layer),
                        csv_field(&r.tensor_kind),
                        r.bit,
                        csv_field(&r.voltages)
                    );
                    if let Err(e) = out.write_all(line.as_bytes()) {
                        io_err = Some(e);
                        return Err(StoreError::Data("write failed".into()));
                    }
                    n += 1;
                    Ok(())
                })
                .map_err(|e| {
                    io_err
                        .take()
                        .map(ExportError::Io)
                        .unwrap_or(ExportError::Store(e))
                })?;
            out.flush()?;
            Ok(n)
        }
        Format::Jsonl => {
            let mut out = std::io::BufWriter::new(out);
            let mut n = 0;
            store.for_each_result(campaign, |r| {
                let mut line =
                    serde_json::to_vec(&r).map_err(|e| StoreError::Data(e.to_string()))?;
                line.push(b'\n');
                out.write_all(&line)
                    .map_err(|e| StoreError::Data(e.to_string()))?;
                n += 1;
                Ok(())
            })?;
            out.flush()?;
            Ok(n)
        }
        Format::Parquet => write_parquet(store, campaign, out),
    }
}

#[derive(Default)]
struct Cols {
    campaign_id: Vec<i64>,
    trial_id: Vec<i64>,
    attempt: Vec<i32>,
    input: Vec<i32>,
    board: Vec<ByteArray>,
    outcome: Vec<ByteArray>,
    failure: Vec<bool>,
    mismatched: Vec<i32>,
    nonfinite: Vec<i32>,
    iou_g: Vec<f32>,
    iou_t: Vec<f32>,
    iou_gt: Vec<f32>,
    latency: Vec<i64>,
    power: Vec<f32>,
    vccint: Vec<f32>,
    temp: Vec<f32>,
    start: Vec<i64>,
    stratum: Vec<i32>,
    model: Vec<ByteArray>,
    layer: Vec<ByteArray>,
    kind: Vec<ByteArray>,
    bit: Vec<i32>,
    voltages: Vec<ByteArray>,
}

impl Cols {
    fn push(&mut self, r: &ResultRow) {
        self.campaign_id.push(r.campaign_id as i64);
        self.trial_id.push(r.trial_id as i64);
        self.attempt.push(r.attempt as i32);
        self.input.push(r.input as i32);
        self.board.push(ByteArray::from(r.board.as_str()));
        self.outcome.push(ByteArray::from(r.outcome));
        self.failure.push(r.failure);
        self.mismatched.push(r.mismatched_pixels as i32);
        self.nonfinite.push(r.nonfinite as i32);
        self.iou_g.push(r.iou_vs_golden);
        self.iou_t.push(r.iou_vs_truth);
        self.iou_gt.push(r.golden_iou_vs_truth);
        self.latency.push(r.latency_ns as i64);
        self.power.push(r.power_w);
        self.vccint.push(r.vccint_mv);
        self.temp.push(r.temp_c);
        self.start.push(r.start_unix_ns as i64);
        self.stratum.push(r.stratum as i32);
        self.model.push(ByteArray::from(r.model.as_str()));
        self.layer.push(ByteArray::from(r.layer.as_str()));
        self.kind.push(ByteArray::from(r.tensor_kind.as_str()));
        self.bit.push(r.bit as i32);
        self.voltages.push(ByteArray::from(r.voltages.as_str()));
    }
    fn len(&self) -> usize {
        self.campaign_id.len()
    }
}

fn flush_group<W: Write + Send>(
    w: &mut SerializedFileWriter<W>,
    c: &mut Cols,
) -> Result<(), parquet::errors::ParquetError> {
    if c.len() == 0 {
        return Ok(());
    }
    let mut rg = w.next_row_group()?;
    let mut i = 0;
    while let Some(mut col) = rg.next_column()? {
        match i {
            0 => col
                .typed::<Int64Type>()
                .write_batch(&c.campaign_id, None, None)?,
            1 => col
                .typed::<Int64Type>()
                .write_batch(&c.trial_id, None, None)?,
            2 => col
                .typed::<Int32Type>()
                .write_batch(&c.attempt, None, None)?,
            3 => col.typed::<Int32Type>().write_batch(&c.input, None, None)?,
            4 => col
                .typed::<ByteArrayType>()
                .write_batch(&c.board, None, None)?,
            5 => col
                .typed::<ByteArrayType>()
                .write_batch(&c.outcome, None, None)?,
            6 => col
                .typed::<BoolType>()
                .write_batch(&c.failure, None, None)?,
            7 => col
                .typed::<Int32Type>()
                .write_batch(&c.mismatched, None, None)?,
            8 => col
                .typed::<Int32Type>()
                .write_batch(&c.nonfinite, None, None)?,
            9 => col.typed::<FloatType>().write_batch(&c.iou_g, None, None)?,
            10 => col.typed::<FloatType>().write_batch(&c.iou_t, None, None)?,
            11 => col
                .typed::<FloatType>()
                .write_batch(&c.iou_gt, None, None)?,
            12 => col
                .typed::<Int64Type>()
                .write_batch(&c.latency, None, None)?,
            13 => col.typed::<FloatType>().write_batch(&c.power, None, None)?,
            14 => col
                .typed::<FloatType>()
                .write_batch(&c.vccint, None, None)?,
            15 => col.typed::<FloatType>().write_batch(&c.temp, None, None)?,
            16 => col.typed::<Int64Type>().write_batch(&c.start, None, None)?,
            17 => col
                .typed::<Int32Type>()
                .write_batch(&c.stratum, None, None)?,
            18 => col
                .typed::<ByteArrayType>()
                .write_batch(&c.model, None, None)?,
            19 => col
                .typed::<ByteArrayType>()
                .write_batch(&c.layer, None, None)?,
            20 => col
                .typed::<ByteArrayType>()
                .write_batch(&c.kind, None, None)?,
            21 => col.typed::<Int32Type>().write_batch(&c.bit, None, None)?,
            _ => col
                .typed::<ByteArrayType>()
                .write_batch(&c.voltages, None, None)?,
        };
        col.close()?;
        i += 1;
    }
    rg.close()?;
    *c = Cols::default();
    Ok(())
}

fn write_parquet<W: Write + Send>(
    store: &Store,
    campaign: u64,
    out: W,
) -> Result<u64, ExportError> {
    let schema = Arc::new(parse_message_type(SCHEMA)?);
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(Compression::UNCOMPRESSED)
            .build(),
    );
    let mut w = SerializedFileWriter::new(out, schema, props)?;
    let mut cols = Cols::default();
    let mut n = 0u64;
    let mut perr = None;
    store
        .for_each_result(campaign, |r| {
            cols.push(&r);
            n += 1;
            if cols.len() >= 65_536
                && let Err(e) = flush_group(&mut w, &mut cols)
            {
                perr = Some(e);
                return Err(StoreError::Data("parquet write failed".into()));
            }
            Ok(())
        })
        .map_err(|e| {
            perr.take()
                .map(ExportError::Parquet)
                .unwrap_or(ExportError::Store(e))
        })?;
    flush_group(&mut w, &mut cols)?;
    w.close()?;
    Ok(n)
}
