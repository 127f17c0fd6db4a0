//! The incremental Matroska parser behind PutMedia.
//!
//! Bytes are pushed in whatever pieces the HTTP body delivers them; [`MkvParser::push`]
//! returns the events they complete. A body is one or more EBML documents (EBML header, then a
//! Segment of known or unknown size). Level-1 elements before a document's first Cluster (Info,
//! Tracks, SeekHead, Void, leading Tags) form the document header that every GetMedia chunk
//! repeats. Each Cluster, of known or unknown size, is one fragment: an unknown-size cluster
//! ends at the next level-1 element, at a new EBML header or at the end of the body; its
//! element header is kept as received, so it goes back out in the same size form. Level-1
//! elements after a cluster (Tags, Cues, Void, …) are reported so they stay with it. Cluster
//! children are held until complete (bounded by the fragment size limit) so that blocks can be
//! checked; nothing else is buffered beyond the element being read.
//!
//! No maintained crate parses EBML incrementally from a push-style byte stream with unknown
//! sizes (the existing ones read from a blocking `Read` or need the whole file), so the
//! parser is written here; it is covered by unit tests, a deterministic random-bytes test and a
//! cargo-fuzz target.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::ebml::{self, EbmlError};

pub const ID_EBML: u32 = 0x1A45DFA3;
pub const ID_DOCTYPE: u32 = 0x4282;
pub const ID_SEGMENT: u32 = 0x18538067;
pub const ID_SEEKHEAD: u32 = 0x114D9B74;
pub const ID_INFO: u32 = 0x1549A966;
pub const ID_TIMECODE_SCALE: u32 = 0x2AD7B1;
pub const ID_TRACKS: u32 = 0x1654AE6B;
pub const ID_TRACK_ENTRY: u32 = 0xAE;
pub const ID_TRACK_NUMBER: u32 = 0xD7;
pub const ID_TRACK_TYPE: u32 = 0x83;
pub const ID_CODEC_ID: u32 = 0x86;
pub const ID_CODEC_PRIVATE: u32 = 0x63A2;
pub const ID_DEFAULT_DURATION: u32 = 0x23E383;
pub const ID_CLUSTER: u32 = 0x1F43B675;
pub const ID_TIMECODE: u32 = 0xE7;
pub const ID_SIMPLE_BLOCK: u32 = 0xA3;
pub const ID_BLOCK_GROUP: u32 = 0xA0;
pub const ID_BLOCK: u32 = 0xA1;
pub const ID_BLOCK_DURATION: u32 = 0x9B;
pub const ID_CUES: u32 = 0x1C53BB6B;
pub const ID_CHAPTERS: u32 = 0x1043A770;
pub const ID_ATTACHMENTS: u32 = 0x1941A469;
pub const ID_TAGS: u32 = 0x1254C367;
pub const ID_TAG: u32 = 0x7373;
pub const ID_TARGETS: u32 = 0x63C0;
pub const ID_SIMPLE_TAG: u32 = 0x67C8;
pub const ID_TAG_NAME: u32 = 0x45A3;
pub const ID_TAG_STRING: u32 = 0x4487;
pub const ID_VOID: u32 = 0xEC;
pub const ID_CRC32: u32 = 0xBF;

/// The largest fragment (cluster) accepted: 50 MB.
pub const MAX_FRAGMENT_BYTES: u64 = 50 * 1024 * 1024;
/// The largest non-cluster level-1 element (Tracks with codec private data, Tags, …).
const MAX_HEADER_ELEMENT_BYTES: u64 = 8 * 1024 * 1024;

/// Why a body was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MkvError {
    #[error("invalid MKV: {0}")]
    Invalid(String),
    #[error("fragment larger than 50 MB")]
    FragmentTooLarge,
}

impl From<EbmlError> for MkvError {
    fn from(e: EbmlError) -> Self {
        MkvError::Invalid(e.0)
    }
}

fn invalid(message: impl Into<String>) -> MkvError {
    MkvError::Invalid(message.into())
}

/// A track declared in a document's Tracks element.
#[derive(Debug, Clone, PartialEq)]
pub struct Track {
    pub number: u64,
    pub track_type: u64,
    pub codec_id: String,
    pub codec_private: Bytes,
    /// Nanoseconds per frame, when declared.
    pub default_duration_ns: Option<u64>,
}

/// What every fragment of one EBML document shares.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// The EBML header element exactly as received.
    pub ebml_header: Bytes,
    /// The level-1 elements before the first Cluster, exactly as received.
    pub segment_prefix: Bytes,
    /// Nanoseconds per timecode tick (default 1 000 000).
    pub timecode_scale: u64,
    pub tracks: Vec<Track>,
}

/// One frame of a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockInfo {
    pub track: u64,
    /// Cluster timecode plus the block's relative offset, in ticks.
    pub timecode: i64,
    /// Block duration in ticks, when given (BlockGroup).
    pub duration: Option<u64>,
    pub keyframe: bool,
    /// Offset and length of the frame payload within [`Cluster::body`].
    pub data_offset: usize,
    pub data_len: usize,
}

/// A complete cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    pub timecode: i64,
    /// The Cluster element's ID and size exactly as received: known size in whatever width
    /// the producer chose, or the unknown-size marker. KVS echoes it unchanged in GetMedia.
    pub header: Bytes,
    /// The cluster's children exactly as received.
    pub body: Bytes,
    pub blocks: Vec<BlockInfo>,
    /// The whole element, `header` then `body` (both are slices of it).
    pub element: Bytes,
}

impl Cluster {
    /// The cluster element as the producer sent it (its own header, then the children).
    pub fn to_element(&self) -> Bytes {
        self.element.clone()
    }
}

/// One SimpleTag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimpleTag {
    pub name: String,
    pub value: String,
    /// Whether its Tag has non-empty Targets (a track or edition tag such as ffmpeg writes);
    /// producer fragment metadata is untargeted.
    pub targeted: bool,
}

/// What a push of bytes completed.
#[derive(Debug, Clone, PartialEq)]
pub enum MkvEvent {
    /// A Cluster element started (its header was read); the document is complete.
    ClusterStart { document: Arc<Document> },
    /// The open cluster's Timecode element arrived (ticks, exactly as received).
    ClusterTimecode(i64),
    /// The cluster that started last is complete.
    ClusterEnd(Cluster),
    /// A level-1 Tags element after the document's first cluster.
    Tags { bytes: Bytes, tags: Vec<SimpleTag> },
    /// Another level-1 element after the document's first cluster (Cues, Void, …): like
    /// Tags, it stays with the fragment it follows, as in real GetMedia output.
    Trailing(Bytes),
}

#[derive(Debug)]
enum State {
    /// Between documents: expecting an EBML header.
    TopLevel,
    /// After the EBML header: expecting the Segment.
    AfterHeader,
    /// Inside a Segment; `end` is the absolute end offset when the size is known.
    Segment { end: Option<u64> },
    /// Inside a Cluster.
    Cluster {
        end: Option<u64>,
        segment_end: Option<u64>,
    },
}

/// The most a cluster buffer is sized ahead of its data.
const MAX_PREALLOCATED_CLUSTER_BYTES: usize = 8 << 20;

/// The push parser. Feed it with [`push`](MkvParser::push), end with
/// [`finish`](MkvParser::finish).
#[derive(Debug)]
pub struct MkvParser {
    buf: BytesMut,
    /// Absolute stream offset of `buf[0]`.
    pos: u64,
    state: State,
    ebml_header: Option<Bytes>,
    prefix: Vec<u8>,
    document: Option<Arc<Document>>,
    /// The open cluster's element header, then its children as they complete.
    cluster_element: Vec<u8>,
    cluster_header_len: usize,
    /// Size of the previous cluster element, to size the next one's buffer.
    last_cluster_len: usize,
    cluster_timecode: Option<i64>,
    blocks: Vec<BlockInfo>,
    /// Whether any complete document byte was seen (an empty body is not MKV).
    documents_seen: usize,
}

impl Default for MkvParser {
    fn default() -> Self {
        Self::new()
    }
}

impl MkvParser {
    pub fn new() -> Self {
        MkvParser {
            buf: BytesMut::new(),
            pos: 0,
            state: State::TopLevel,
            ebml_header: None,
            prefix: Vec::new(),
            document: None,
            cluster_element: Vec::new(),
            cluster_header_len: 0,
            last_cluster_len: 0,
            cluster_timecode: None,
            blocks: Vec::new(),
            documents_seen: 0,
        }
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Whether a cluster is open.
    pub fn in_cluster(&self) -> bool {
        matches!(self.state, State::Cluster { .. })
    }

    /// The open cluster's Timecode (once read) and the children received so far: whole
    /// elements only, growing until the cluster ends (low-latency HLS reads frames from it).
    pub fn open_cluster(&self) -> Option<(i64, &[u8])> {
        if !self.in_cluster() {
            return None;
        }
        self.cluster_timecode
            .map(|tc| (tc, &self.cluster_element[self.cluster_header_len..]))
    }

    /// Bytes of the open cluster held so far.
    pub fn open_cluster_bytes(&self) -> usize {
        self.cluster_body_len()
    }

    /// Feeds bytes; returns the events they complete.
    pub fn push(&mut self, data: &[u8]) -> Result<Vec<MkvEvent>, MkvError> {
        let mut events = Vec::new();
        self.push_into(data, &mut events)?;
        Ok(events)
    }

    /// Feeds bytes, appending the events they complete to `events`; on error, the events
    /// completed before the error are still there.
    pub fn push_into(&mut self, data: &[u8], events: &mut Vec<MkvEvent>) -> Result<(), MkvError> {
        self.buf.extend_from_slice(data);
        while self.step(events)? {}
        Ok(())
    }

    /// Ends the body: closes an open unknown-size cluster and checks nothing is left over.
    pub fn finish(&mut self) -> Result<Vec<MkvEvent>, MkvError> {
        let mut events = Vec::new();
        if let State::Cluster { end, .. } = self.state {
            if end.is_some() {
                return Err(invalid("body ended inside a cluster"));
            }
            if !self.buf.is_empty() {
                return Err(invalid("body ended inside a cluster element"));
            }
            events.push(MkvEvent::ClusterEnd(self.close_cluster()?));
            self.state = State::Segment { end: None };
        }
        if !self.buf.is_empty() {
            return Err(invalid(format!(
                "body ended inside an element ({} bytes left over)",
                self.buf.len()
            )));
        }
        if self.documents_seen == 0 {
            return Err(invalid("body holds no EBML document"));
        }
        Ok(events)
    }

    fn cluster_body_len(&self) -> usize {
        self.cluster_element.len() - self.cluster_header_len
    }

    fn consume(&mut self, n: usize) -> Bytes {
        self.pos += n as u64;
        self.buf.split_to(n).freeze()
    }

    /// Takes one step; `Ok(false)` when more bytes are needed.
    fn step(&mut self, events: &mut Vec<MkvEvent>) -> Result<bool, MkvError> {
        // A known-size Segment or Cluster ends exactly at its declared end.
        match self.state {
            State::Cluster {
                end: Some(end),
                segment_end,
            } if self.pos >= end => {
                if self.pos > end {
                    return Err(invalid("cluster child overruns the cluster"));
                }
                events.push(MkvEvent::ClusterEnd(self.close_cluster()?));
                self.state = State::Segment { end: segment_end };
                return Ok(true);
            }
            State::Segment { end: Some(end) } if self.pos >= end => {
                if self.pos > end {
                    return Err(invalid("element overruns the segment"));
                }
                self.state = State::TopLevel;
                return Ok(true);
            }
            _ => {}
        }
        let Some(header) = ebml::read_header(&self.buf)? else {
            return Ok(false);
        };
        match self.state {
            State::TopLevel => match header.id {
                ID_EBML => self.read_ebml_header(header),
                ID_VOID => self
                    .skip_element(header, MAX_HEADER_ELEMENT_BYTES)
                    .map(|s| s.is_some()),
                id => Err(invalid(format!(
                    "expected an EBML header, found element {id:#x}"
                ))),
            },
            State::AfterHeader => match header.id {
                ID_SEGMENT => {
                    self.consume(header.header_len);
                    let end = header.size.map(|s| self.pos + s);
                    self.state = State::Segment { end };
                    self.prefix.clear();
                    self.document = None;
                    Ok(true)
                }
                ID_VOID => self
                    .skip_element(header, MAX_HEADER_ELEMENT_BYTES)
                    .map(|s| s.is_some()),
                id => Err(invalid(format!(
                    "expected a Segment after the EBML header, found {id:#x}"
                ))),
            },
            State::Segment { end } => self.segment_child(header, end, events),
            State::Cluster { end, segment_end } => {
                self.cluster_child(header, end, segment_end, events)
            }
        }
    }

    fn read_ebml_header(&mut self, header: ebml::ElementHeader) -> Result<bool, MkvError> {
        let size = header
            .size
            .ok_or_else(|| invalid("EBML header has unknown size"))?;
        if size > 4096 {
            return Err(invalid("EBML header larger than 4 KiB"));
        }
        let total = header.header_len + size as usize;
        if self.buf.len() < total {
            return Ok(false);
        }
        let bytes = self.consume(total);
        let mut doctype = None;
        for child in ebml::children(&bytes[header.header_len..]) {
            let (id, data) = child?;
            if id == ID_DOCTYPE {
                doctype = Some(ebml::read_string(data));
            }
        }
        match doctype.as_deref() {
            Some("matroska") | Some("webm") => {}
            other => {
                return Err(invalid(format!(
                    "EBML DocType must be matroska or webm, found {other:?}"
                )))
            }
        }
        self.ebml_header = Some(bytes);
        self.documents_seen += 1;
        self.state = State::AfterHeader;
        Ok(true)
    }

    /// Skips a complete element; returns its bytes once all have arrived.
    fn skip_element(
        &mut self,
        header: ebml::ElementHeader,
        limit: u64,
    ) -> Result<Option<Bytes>, MkvError> {
        let size = header
            .size
            .ok_or_else(|| invalid(format!("element {:#x} has unknown size", header.id)))?;
        if size > limit {
            return Err(invalid(format!(
                "element {:#x} of {size} bytes is too large",
                header.id
            )));
        }
        let total = header.header_len + size as usize;
        if self.buf.len() < total {
            return Ok(None);
        }
        Ok(Some(self.consume(total)))
    }

    fn segment_child(
        &mut self,
        header: ebml::ElementHeader,
        segment_end: Option<u64>,
        events: &mut Vec<MkvEvent>,
    ) -> Result<bool, MkvError> {
        match header.id {
            ID_EBML => {
                // A new document starts inside an unknown-size segment.
                if segment_end.is_some() {
                    return Err(invalid("EBML header inside a known-size segment"));
                }
                self.state = State::TopLevel;
                Ok(true)
            }
            ID_CLUSTER => {
                let document = match &self.document {
                    Some(d) => d.clone(),
                    None => {
                        let d = Arc::new(self.build_document()?);
                        self.document = Some(d.clone());
                        d
                    }
                };
                let cluster_header = self.consume(header.header_len);
                let end = header.size.map(|s| self.pos + s);
                if let (Some(end), Some(segment_end)) = (end, segment_end) {
                    if end > segment_end {
                        return Err(invalid("cluster overruns the segment"));
                    }
                }
                if header.size.is_some_and(|s| s > MAX_FRAGMENT_BYTES) {
                    return Err(MkvError::FragmentTooLarge);
                }
                // Room for the whole cluster up front (its declared size, else the size of the
                // previous one), within reason: a declared size is not yet data.
                let capacity = match header.size {
                    Some(size) => size as usize,
                    None => self.last_cluster_len,
                }
                .min(MAX_PREALLOCATED_CLUSTER_BYTES);
                self.cluster_element = Vec::with_capacity(cluster_header.len() + capacity);
                self.cluster_element.extend_from_slice(&cluster_header);
                self.cluster_header_len = cluster_header.len();
                self.cluster_timecode = None;
                self.blocks.clear();
                self.state = State::Cluster { end, segment_end };
                events.push(MkvEvent::ClusterStart { document });
                Ok(true)
            }
            ID_SIMPLE_BLOCK | ID_BLOCK_GROUP | ID_TIMECODE | ID_TRACK_ENTRY => Err(invalid(
                format!("element {:#x} outside a cluster", header.id),
            )),
            id => {
                let Some(bytes) = self.skip_element(header, MAX_HEADER_ELEMENT_BYTES)? else {
                    return Ok(false);
                };
                if let Some(end) = segment_end {
                    if self.pos > end {
                        return Err(invalid("element overruns the segment"));
                    }
                }
                if self.document.is_none() {
                    let service_output = id == ID_TAGS
                        && parse_tags(&bytes[header.header_len..])?
                            .iter()
                            .any(|t| is_service_output_tag(&t.name));
                    // Tags the service itself writes into GetMedia output are regenerated on
                    // the way out, so re-ingested GetMedia output does not repeat them.
                    if !service_output {
                        self.prefix.extend_from_slice(&bytes);
                    }
                } else if id == ID_TAGS {
                    let tags = parse_tags(&bytes[header.header_len..])?;
                    events.push(MkvEvent::Tags { bytes, tags });
                } else {
                    events.push(MkvEvent::Trailing(bytes));
                }
                Ok(true)
            }
        }
    }

    fn cluster_child(
        &mut self,
        header: ebml::ElementHeader,
        cluster_end: Option<u64>,
        segment_end: Option<u64>,
        events: &mut Vec<MkvEvent>,
    ) -> Result<bool, MkvError> {
        let ends_unknown_cluster = matches!(
            header.id,
            ID_CLUSTER
                | ID_TAGS
                | ID_EBML
                | ID_INFO
                | ID_TRACKS
                | ID_CUES
                | ID_SEEKHEAD
                | ID_CHAPTERS
                | ID_ATTACHMENTS
                | ID_SEGMENT
        );
        if ends_unknown_cluster {
            if cluster_end.is_some() {
                return Err(invalid(format!(
                    "level-1 element {:#x} inside a known-size cluster",
                    header.id
                )));
            }
            events.push(MkvEvent::ClusterEnd(self.close_cluster()?));
            self.state = State::Segment { end: segment_end };
            return Ok(true);
        }
        let size = header
            .size
            .ok_or_else(|| invalid(format!("cluster child {:#x} has unknown size", header.id)))?;
        if self.cluster_body_len() as u64 + header.header_len as u64 + size > MAX_FRAGMENT_BYTES {
            return Err(MkvError::FragmentTooLarge);
        }
        let total = header.header_len + size as usize;
        if let Some(end) = cluster_end {
            if self.pos + total as u64 > end {
                return Err(invalid("cluster child overruns the cluster"));
            }
        }
        if self.buf.len() < total {
            return Ok(false);
        }
        let bytes = self.consume(total);
        let offset = self.cluster_body_len();
        let data = &bytes[header.header_len..];
        match header.id {
            ID_TIMECODE => {
                if self.cluster_timecode.is_some() {
                    return Err(invalid("cluster has two Timecode elements"));
                }
                let tc = ebml::read_uint(data)?;
                let tc = i64::try_from(tc).map_err(|_| invalid("cluster timecode too large"))?;
                self.cluster_timecode = Some(tc);
                events.push(MkvEvent::ClusterTimecode(tc));
            }
            ID_SIMPLE_BLOCK => {
                let block = self.parse_block(data, offset + header.header_len, None)?;
                self.blocks.push(block);
            }
            ID_BLOCK_GROUP => {
                let base = bytes.as_ptr() as usize;
                let (block_data, duration) = block_group_parts(data)?;
                let block_offset = offset + (block_data.as_ptr() as usize - base);
                let block = self.parse_block(block_data, block_offset, duration)?;
                self.blocks.push(block);
            }
            _ => {}
        }
        self.cluster_element.extend_from_slice(&bytes);
        Ok(true)
    }

    fn parse_block(
        &self,
        data: &[u8],
        data_offset: usize,
        duration: Option<u64>,
    ) -> Result<BlockInfo, MkvError> {
        let cluster_tc = self
            .cluster_timecode
            .ok_or_else(|| invalid("block before the cluster Timecode"))?;
        let (track, len) = ebml::read_vint(data)?;
        if data.len() < len + 3 {
            return Err(invalid("block shorter than its header"));
        }
        let relative = i16::from_be_bytes([data[len], data[len + 1]]);
        let flags = data[len + 2];
        Ok(BlockInfo {
            track,
            timecode: cluster_tc + i64::from(relative),
            duration,
            keyframe: flags & 0x80 != 0,
            data_offset: data_offset + len + 3,
            data_len: data.len() - len - 3,
        })
    }

    fn close_cluster(&mut self) -> Result<Cluster, MkvError> {
        let timecode = self
            .cluster_timecode
            .take()
            .ok_or_else(|| invalid("cluster without a Timecode"))?;
        let element = Bytes::from(std::mem::take(&mut self.cluster_element));
        self.last_cluster_len = element.len();
        Ok(Cluster {
            timecode,
            header: element.slice(..self.cluster_header_len),
            body: element.slice(self.cluster_header_len..),
            element,
            blocks: std::mem::take(&mut self.blocks),
        })
    }

    fn build_document(&self) -> Result<Document, MkvError> {
        let ebml_header = self
            .ebml_header
            .clone()
            .ok_or_else(|| invalid("cluster before an EBML header"))?;
        let mut timecode_scale = 1_000_000;
        let mut tracks = Vec::new();
        for element in ebml::children(&self.prefix) {
            let (id, data) = element?;
            match id {
                ID_INFO => {
                    for child in ebml::children(data) {
                        let (cid, cdata) = child?;
                        if cid == ID_TIMECODE_SCALE {
                            timecode_scale = ebml::read_uint(cdata)?;
                        }
                    }
                }
                ID_TRACKS => {
                    for entry in ebml::children(data) {
                        let (eid, edata) = entry?;
                        if eid == ID_TRACK_ENTRY {
                            tracks.push(parse_track(edata)?);
                        }
                    }
                }
                _ => {}
            }
        }
        if timecode_scale == 0 {
            return Err(invalid("TimecodeScale is 0"));
        }
        if tracks.is_empty() {
            return Err(invalid("cluster before any Tracks"));
        }
        Ok(Document {
            ebml_header,
            segment_prefix: Bytes::from(self.prefix.clone()),
            timecode_scale,
            tracks,
        })
    }
}

fn parse_track(data: &[u8]) -> Result<Track, MkvError> {
    let mut track = Track {
        number: 0,
        track_type: 0,
        codec_id: String::new(),
        codec_private: Bytes::new(),
        default_duration_ns: None,
    };
    for child in ebml::children(data) {
        let (id, value) = child?;
        match id {
            ID_TRACK_NUMBER => track.number = ebml::read_uint(value)?,
            ID_TRACK_TYPE => track.track_type = ebml::read_uint(value)?,
            ID_CODEC_ID => track.codec_id = ebml::read_string(value),
            ID_CODEC_PRIVATE => track.codec_private = Bytes::copy_from_slice(value),
            ID_DEFAULT_DURATION => track.default_duration_ns = Some(ebml::read_uint(value)?),
            _ => {}
        }
    }
    if track.number == 0 {
        return Err(invalid("TrackEntry without a TrackNumber"));
    }
    Ok(track)
}

/// Tag names that only the service writes (GetMedia output), never producers.
pub fn is_service_output_tag(name: &str) -> bool {
    matches!(
        name,
        "AWS_KINESISVIDEO_FRAGMENT_NUMBER"
            | "AWS_KINESISVIDEO_SERVER_TIMESTAMP"
            | "AWS_KINESISVIDEO_PRODUCER_TIMESTAMP"
            | "AWS_KINESISVIDEO_MILLIS_BEHIND_NOW"
            | "AWS_KINESISVIDEO_CONTINUATION_TOKEN"
            | "AWS_KINESISVIDEO_ERROR_ID"
            | "AWS_KINESISVIDEO_ERROR_CODE"
    )
}

/// The SimpleTags of a Tags element's payload.
pub fn parse_tags(data: &[u8]) -> Result<Vec<SimpleTag>, MkvError> {
    let mut out = Vec::new();
    for tag in ebml::children(data) {
        let (id, tag_data) = tag?;
        if id != ID_TAG {
            continue;
        }
        let mut targeted = false;
        for child in ebml::children(tag_data) {
            let (cid, cdata) = child?;
            if cid == ID_TARGETS && !cdata.is_empty() {
                targeted = true;
            }
        }
        for child in ebml::children(tag_data) {
            let (cid, cdata) = child?;
            if cid == ID_SIMPLE_TAG {
                collect_simple_tag(cdata, targeted, &mut out)?;
            }
        }
    }
    Ok(out)
}

fn collect_simple_tag(
    data: &[u8],
    targeted: bool,
    out: &mut Vec<SimpleTag>,
) -> Result<(), MkvError> {
    let mut name = None;
    let mut value = String::new();
    for child in ebml::children(data) {
        let (id, cdata) = child?;
        match id {
            ID_TAG_NAME => name = Some(ebml::read_string(cdata)),
            ID_TAG_STRING => value = ebml::read_string(cdata),
            ID_SIMPLE_TAG => collect_simple_tag(cdata, targeted, out)?,
            _ => {}
        }
    }
    if let Some(name) = name {
        out.push(SimpleTag {
            name,
            value,
            targeted,
        });
    }
    Ok(())
}

/// A Tags element holding one Tag with the given SimpleTags (4-byte sizes, as KVS writes).
pub fn tags_element(tags: &[(&str, &str)]) -> Vec<u8> {
    let mut simple_tags = Vec::new();
    for (name, value) in tags {
        let mut st = Vec::new();
        ebml::write_element(&mut st, ID_TAG_NAME, name.as_bytes());
        ebml::write_element(&mut st, ID_TAG_STRING, value.as_bytes());
        ebml::write_id(&mut simple_tags, ID_SIMPLE_TAG);
        ebml::write_size_width(&mut simple_tags, st.len() as u64, 4);
        simple_tags.extend_from_slice(&st);
    }
    let mut tag = Vec::new();
    ebml::write_id(&mut tag, ID_TAG);
    ebml::write_size_width(&mut tag, simple_tags.len() as u64, 4);
    tag.extend_from_slice(&simple_tags);
    let mut out = Vec::new();
    ebml::write_id(&mut out, ID_TAGS);
    ebml::write_size_width(&mut out, tag.len() as u64, 4);
    out.extend_from_slice(&tag);
    out
}

/// The Block payload and BlockDuration of a BlockGroup payload.
fn block_group_parts(data: &[u8]) -> Result<(&[u8], Option<u64>), MkvError> {
    let mut block = None;
    let mut duration = None;
    for child in ebml::children(data) {
        let (id, child_data) = child?;
        if id == ID_BLOCK {
            block = Some(child_data);
        } else if id == ID_BLOCK_DURATION {
            duration = Some(ebml::read_uint(child_data)?);
        }
    }
    Ok((
        block.ok_or_else(|| invalid("BlockGroup without a Block"))?,
        duration,
    ))
}

/// The frames of a stored cluster body (for readers and packagers).
pub fn cluster_blocks(timecode: i64, body: &[u8]) -> Result<Vec<BlockInfo>, MkvError> {
    let mut parser = MkvParser::new();
    parser.cluster_timecode = Some(timecode);
    let base = body.as_ptr() as usize;
    let mut out = Vec::new();
    for child in ebml::children(body) {
        let (id, data) = child?;
        match id {
            ID_SIMPLE_BLOCK => {
                out.push(parser.parse_block(data, data.as_ptr() as usize - base, None)?)
            }
            ID_BLOCK_GROUP => {
                let (block_data, duration) = block_group_parts(data)?;
                let block_offset = block_data.as_ptr() as usize - base;
                out.push(parser.parse_block(block_data, block_offset, duration)?);
            }
            _ => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ebml::{write_element, write_id, write_size};

    /// A small document: EBML header, unknown-size Segment, Info, Tracks with `tracks`.
    pub fn document_header(tracks: &[u64]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut header = Vec::new();
        write_element(&mut header, ID_DOCTYPE, b"matroska");
        write_element(&mut out, ID_EBML, &header);
        ebml::write_unknown_size_header(&mut out, ID_SEGMENT);
        let mut info = Vec::new();
        write_element(&mut info, ID_TIMECODE_SCALE, &[0x0F, 0x42, 0x40]);
        write_element(&mut out, ID_INFO, &info);
        let mut entries = Vec::new();
        for &n in tracks {
            let mut entry = Vec::new();
            write_element(&mut entry, ID_TRACK_NUMBER, &[n as u8]);
            write_element(&mut entry, ID_TRACK_TYPE, &[1]);
            write_element(&mut entry, ID_CODEC_ID, b"V_MPEG4/ISO/AVC");
            write_element(
                &mut entry,
                ID_DEFAULT_DURATION,
                &40_000_000u32.to_be_bytes(),
            );
            write_element(&mut entries, ID_TRACK_ENTRY, &entry);
        }
        write_element(&mut out, ID_TRACKS, &entries);
        out
    }

    /// An unknown-size cluster at `timecode` with one block per `(track, offset)`.
    pub fn cluster(timecode: u64, blocks: &[(u64, i16)], known_size: bool) -> Vec<u8> {
        let mut body = Vec::new();
        write_element(&mut body, ID_TIMECODE, &timecode.to_be_bytes());
        for (i, &(track, offset)) in blocks.iter().enumerate() {
            let mut block = vec![0x80 | track as u8];
            block.extend_from_slice(&offset.to_be_bytes());
            block.push(if i == 0 { 0x80 } else { 0 });
            block.extend_from_slice(&[i as u8; 7]);
            write_element(&mut body, ID_SIMPLE_BLOCK, &block);
        }
        let mut out = Vec::new();
        write_id(&mut out, ID_CLUSTER);
        if known_size {
            write_size(&mut out, body.len() as u64);
        } else {
            out.push(0xFF);
        }
        out.extend_from_slice(&body);
        out
    }

    fn parse_all(data: &[u8], piece: usize) -> Result<Vec<MkvEvent>, MkvError> {
        let mut parser = MkvParser::new();
        let mut events = Vec::new();
        for chunk in data.chunks(piece.max(1)) {
            events.extend(parser.push(chunk)?);
        }
        events.extend(parser.finish()?);
        Ok(events)
    }

    #[test]
    fn unknown_size_clusters_split_into_fragments_at_any_piece_size() {
        let mut body = document_header(&[1]);
        body.extend(cluster(0, &[(1, 0), (1, 40)], false));
        body.extend(tags_element(&[("note", "a")]));
        body.extend(cluster(1000, &[(1, 0), (1, 40)], true));
        body.extend(cluster(2000, &[(1, 0)], false));
        for piece in [1, 2, 3, 7, 64, 100_000] {
            let events = parse_all(&body, piece).unwrap();
            let ends: Vec<i64> = events
                .iter()
                .filter_map(|e| match e {
                    MkvEvent::ClusterEnd(c) => Some(c.timecode),
                    _ => None,
                })
                .collect();
            assert_eq!(ends, vec![0, 1000, 2000], "piece size {piece}");
            let tags: Vec<_> = events
                .iter()
                .filter_map(|e| match e {
                    MkvEvent::Tags { tags, .. } => Some(tags.clone()),
                    _ => None,
                })
                .collect();
            assert_eq!(
                tags,
                vec![vec![SimpleTag {
                    name: "note".into(),
                    value: "a".into(),
                    targeted: false,
                }]]
            );
        }
    }

    #[test]
    fn clusters_keep_their_size_form_and_trailing_elements_stay_in_order() {
        let mut body = document_header(&[1]);
        let unknown = cluster(0, &[(1, 0)], false);
        let known = cluster(1000, &[(1, 0)], true);
        let mut cues = Vec::new();
        write_element(&mut cues, ID_CUES, &[0xBB, 0x80]);
        body.extend(&unknown);
        body.extend(&cues);
        body.extend(tags_element(&[("after", "cues")]));
        body.extend(&known);
        for piece in [1, 5, 1000] {
            let events = parse_all(&body, piece).unwrap();
            let elements: Vec<Vec<u8>> = events
                .iter()
                .filter_map(|e| match e {
                    MkvEvent::ClusterEnd(c) => Some(c.to_element().to_vec()),
                    MkvEvent::Trailing(bytes) => Some(bytes.to_vec()),
                    MkvEvent::Tags { bytes, .. } => Some(bytes.to_vec()),
                    _ => None,
                })
                .collect();
            // The unknown-size cluster goes back out unknown-size, the known-size one as sent.
            assert_eq!(
                elements,
                vec![
                    unknown.clone(),
                    cues.clone(),
                    tags_element(&[("after", "cues")]),
                    known.clone()
                ],
                "piece size {piece}"
            );
        }
    }

    #[test]
    fn blocks_carry_tracks_timecodes_and_payload_offsets() {
        let mut body = document_header(&[1, 2]);
        body.extend(cluster(500, &[(1, 0), (2, 20), (1, -5)], false));
        let events = parse_all(&body, 5).unwrap();
        let MkvEvent::ClusterEnd(c) = events.last().unwrap() else {
            panic!("no cluster")
        };
        let summary: Vec<_> = c.blocks.iter().map(|b| (b.track, b.timecode)).collect();
        assert_eq!(summary, vec![(1, 500), (2, 520), (1, 495)]);
        assert!(c.blocks[0].keyframe && !c.blocks[1].keyframe);
        let b = c.blocks[1];
        assert_eq!(
            &c.body[b.data_offset..b.data_offset + b.data_len],
            &[1u8; 7]
        );
        assert_eq!(cluster_blocks(c.timecode, &c.body).unwrap(), c.blocks);
        let MkvEvent::ClusterStart { document } = &events[0] else {
            panic!("no start")
        };
        assert_eq!(document.tracks.len(), 2);
        assert_eq!(document.timecode_scale, 1_000_000);
    }

    #[test]
    fn several_documents_in_one_body() {
        let mut body = document_header(&[1]);
        body.extend(cluster(0, &[(1, 0)], false));
        body.extend(document_header(&[1, 2]));
        body.extend(cluster(1000, &[(1, 0), (2, 0)], false));
        let events = parse_all(&body, 11).unwrap();
        let docs: Vec<usize> = events
            .iter()
            .filter_map(|e| match e {
                MkvEvent::ClusterStart { document } => Some(document.tracks.len()),
                _ => None,
            })
            .collect();
        assert_eq!(docs, vec![1, 2]);
    }

    #[test]
    fn garbage_and_truncation_are_invalid() {
        assert!(matches!(
            parse_all(b"this is not matroska", 4),
            Err(MkvError::Invalid(_))
        ));
        assert!(parse_all(&[], 1).is_err());
        let mut body = document_header(&[1]);
        body.extend(cluster(0, &[(1, 0)], true));
        body.truncate(body.len() - 3);
        assert!(parse_all(&body, 9).is_err());
        // A cluster before Tracks.
        let mut header = Vec::new();
        write_element(&mut header, ID_DOCTYPE, b"matroska");
        let mut body = Vec::new();
        write_element(&mut body, ID_EBML, &header);
        ebml::write_unknown_size_header(&mut body, ID_SEGMENT);
        body.extend(cluster(0, &[(1, 0)], false));
        assert!(parse_all(&body, 9).is_err());
    }

    /// Deterministic pseudo-random input (fixed-seed xorshift): random bytes, and valid
    /// bodies with random corruptions, fed in random piece sizes; the parser must return
    /// (success or error) without panicking, and never report a cluster larger than 50 MB.
    #[test]
    fn random_bytes_never_panic() {
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut valid = document_header(&[1, 2]);
        valid.extend(cluster(0, &[(1, 0), (2, 3)], false));
        valid.extend(tags_element(&[("k", "v")]));
        valid.extend(cluster(1000, &[(1, 0), (2, 3)], true));
        for round in 0..3000 {
            let mut data = if round % 2 == 0 {
                (0..(next() % 512))
                    .map(|_| next() as u8)
                    .collect::<Vec<u8>>()
            } else {
                let mut d = valid.clone();
                for _ in 0..(1 + next() % 4) {
                    let i = (next() as usize) % d.len();
                    d[i] = next() as u8;
                }
                d
            };
            if round % 7 == 0 {
                data.truncate((next() as usize) % (data.len() + 1));
            }
            let piece = 1 + (next() as usize) % 64;
            let mut parser = MkvParser::new();
            let mut result = Ok(());
            for chunk in data.chunks(piece) {
                if let Err(e) = parser.push(chunk) {
                    result = Err(e);
                    break;
                }
            }
            if result.is_ok() {
                let _ = parser.finish();
            }
        }
        // The untouched body still parses.
        assert_eq!(
            parse_all(&valid, 13)
                .unwrap()
                .iter()
                .filter(|e| matches!(e, MkvEvent::ClusterEnd(_)))
                .count(),
            2
        );
    }
}
