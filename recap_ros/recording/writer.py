"""Episode recorder core (ROS-free): a bounded queue, one writer thread and the episode lifecycle.

Producers (ROS subscription callbacks, or a ROS-free sim rollout) call :meth:`EpisodeRecorder.submit` with the
serialized CDR bytes, the topic and the receive time; it never blocks. A full queue drops the message and
counts it per topic (reported through ``stats()`` and the log, and stored in the bag as ``recap.dropped``).
The writer thread owns every file operation: it writes messages in queue order into the current
:class:`~recap_ros.recording.bag.BagWriter`, flushes a complete MCAP chunk every ``flush_period_s``, watches the
free disk space, and runs start / stop / label requests in order with the messages (a message received before
``stop`` is in the bag, one received after ``start`` is too).

Episode facts (custom_data, docs/ARCHITECTURE.md): the prompt and β are the latest values on their topics
(or the sim's start event). Both intervention facts come from the robot commands themselves, whose source a
JointState command's header.frame_id names (set by the mux): ``recap.intervention_ticks`` counts the commands
from a human input, ``recap.interventions`` the runs of them (human-driven segments; one that is active as the
episode starts counts). The mux's intervention flag is recorded but counts nothing: a hold shorter than a
control period toggles it without the robot ever receiving a non-human command. State-like topics (latched, prompt, β, intervention) are cached while idle and
written at the start of every episode (at the episode's start time), so each bag carries the state it began
in. A state message carries its publication stamp (DDS source timestamp) when the caller has it: one that is
not newer than the last one taken on its topic (a latched value delivered again, e.g. to a re-created
subscription, or late) is dropped, so a state topic is written in stamp order and never goes back to an
older value.

With ``auto_episodes`` the sim's episode events (JSON on the episode topic) drive the lifecycle: a start event
opens a bag for that episode, an end event labels it from ``success`` and closes it.
"""
from __future__ import annotations

import json
import logging
import queue
import shutil
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from rosbags.interfaces import Qos

from recap_ros.recording.bag import (K_BETA, K_INTERVENTIONS, K_OUTCOME, K_PROMPT, BagError, BagWriter,
                                     EpisodeFacts, check_msgtype, ensure_writable_dir, episode_bags,
                                     episode_dir_name, outcome_of, typestore, update_custom_data)

_LOG = logging.getLogger("recap_ros.recording")
_MSG, _CMD, _QUIT = 0, 1, 2


def _snapshot(d: dict) -> dict:
    """Copy of a dict the writer thread may be adding to right now."""
    while True:
        try:
            return dict(d)
        except RuntimeError:  # changed size during iteration
            continue


class RecorderError(RuntimeError):
    """A request cannot be served (already recording, nothing to label, no disk space ...); says why."""


@dataclass(frozen=True)
class RecorderConfig:
    station: str
    output_dir: str
    queue_size: int = 4096
    compression: str = "zstd"
    min_free_disk_mb: int = 512
    auto_episodes: bool = False
    episode_topic: str = "/episode/events"
    prompt_topic: str = "/task/prompt"
    beta_topic: str = "/policy/beta"
    intervention_topic: str = "/mux/intervention"
    command_topic: str = "/robot/command"
    human_inputs: tuple[str, ...] = ()  # mux inputs whose commands are interventions
    model: str = ""
    operator: str = ""
    flush_period_s: float = 0.25   # crash loss bound: at most this much data is only in memory
    disk_check_period_s: float = 1.0
    control_timeout_s: float = 10.0

    @classmethod
    def from_station(cls, station, **overrides) -> "RecorderConfig":
        """Defaults from a recap_ros.station.Station (recorder section, topics); overrides win."""
        r = station.recorder
        base = dict(station=station.name, output_dir=r.output_dir, queue_size=r.queue_size,
                    compression=r.compression, min_free_disk_mb=r.min_free_disk_mb,
                    auto_episodes=r.auto_episodes, episode_topic=station.episode_topic,
                    prompt_topic=station.policy.prompt_topic, beta_topic=station.policy.beta_topic,
                    intervention_topic=station.mux.intervention_topic, command_topic=station.robot.command_topic,
                    human_inputs=tuple(i.name for i in station.mux.inputs if i.human))
        base.update(overrides)
        return cls(**base)


@dataclass
class _Topic:
    msgtype: str
    qos: tuple[Qos, ...] = ()
    latched: bool = False


@dataclass
class EpisodeSummary:
    episode: int
    path: Path
    custom_data: dict[str, str]
    counts: dict[str, int]
    dropped: dict[str, int]
    end_reason: str
    complete: bool  # False: the bag could not be finished; run recap-bag-repair on it

    @property
    def message_count(self) -> int:
        return sum(self.counts.values())


@dataclass
class _Episode:
    facts: EpisodeFacts
    bag: BagWriter
    dropped: dict[str, int] = field(default_factory=dict)
    prompt_fixed: bool = False  # the prompt came with the start request/event: the prompt topic cannot change it
    human_driving: bool = False  # the last robot command came from a human input


class EpisodeRecorder:
    """Bounded-queue, single-writer-thread episode recorder. ``close()`` (or the context manager) ends it."""

    def __init__(self, config: RecorderConfig, log: Callable[[str, str], None] | None = None,
                 disk_free_bytes: Callable[[str], int] | None = None):
        if config.compression not in ("zstd", "none"):
            raise RecorderError(f"recorder compression '{config.compression}' must be zstd or none")
        if config.queue_size < 1:
            raise RecorderError(f"recorder queue_size must be >= 1 (got {config.queue_size})")
        self.config = config
        self._log = log or (lambda level, text: getattr(_LOG, {"warn": "warning"}.get(level, level))(text))
        self._disk_free = disk_free_bytes or (lambda p: shutil.disk_usage(p).free)
        self._topics: dict[str, _Topic] = {}
        self._queue: queue.Queue = queue.Queue(maxsize=config.queue_size)
        # producers enqueue every topic only while an episode may be open; with auto episodes always, so that
        # messages right behind a start event (queued before the writer opens the bag) are not lost
        self._accepting = config.auto_episodes
        self._lock = threading.Lock()  # drop counters
        self.dropped_total: dict[str, int] = {}
        self._episode: _Episode | None = None
        self._last: EpisodeSummary | None = None
        self._next_index: int | None = None
        self._cache: dict[str, tuple[bytes, int]] = {}  # latest message of state-like topics
        self._state_stamp: dict[str, int] = {}  # publication stamp of the newest state message taken per topic
        self.stale_state = 0  # state messages dropped as not newer than one already taken
        self._prompt = ""
        self._beta = ""
        self._last_disk_check = 0.0
        self.last_error = ""
        self.bytes_total = 0
        self.written_total = 0
        self._thread = threading.Thread(target=self._run, name="episode_recorder_writer", daemon=True)
        self._closed = False
        self._thread.start()

    # ------------------------------------------------------------------------------------------ producers
    def add_topic(self, topic: str, msgtype: str, latched: bool = False) -> None:
        """Declare a recorded topic (raises BagError when rosbags has no definition for its type)."""
        check_msgtype(msgtype)
        self._topics[topic] = _Topic(msgtype, (), latched)

    def set_topic_qos(self, topic: str, qos: Sequence[Qos], latched: bool | None = None) -> None:
        """The publishers' offered QoS (stored with the topic in the next bag that sees it)."""
        t = self._topic(topic)
        t.qos = tuple(qos)
        if latched is not None:
            t.latched = latched

    @property
    def topics(self) -> dict[str, str]:
        return {k: v.msgtype for k, v in self._topics.items()}

    def _topic(self, topic: str) -> _Topic:
        try:
            return self._topics[topic]
        except KeyError:
            raise RecorderError(f"topic {topic} is not a recorded topic (add_topic first)") from None

    def _cached(self, topic: str, t: _Topic) -> bool:
        """State-like topics: their latest message is written at the start of every episode."""
        c = self.config
        return t.latched or topic in (c.prompt_topic, c.beta_topic, c.intervention_topic)

    def _is_state(self, topic: str, t: _Topic) -> bool:
        """Topics queued even between episodes (state to cache, or the events that start an episode)."""
        return self._cached(topic, t) or (self.config.auto_episodes and topic == self.config.episode_topic)

    def submit(self, topic: str, data: bytes | memoryview, recv_ns: int | None = None,
               source_ns: int | None = None) -> bool:
        """Hand one serialized message to the writer; never blocks. False when it was not queued: not recording
        (and not a state topic), a state message not newer than the last one (``source_ns``: its publication
        stamp), or dropped because the queue is full (counted per topic)."""
        t = self._topic(topic)
        if self._closed or (not self._accepting and not self._is_state(topic, t)):
            return False
        if source_ns and self._cached(topic, t):
            if source_ns <= self._state_stamp.get(topic, 0):
                self.stale_state += 1
                return False
            self._state_stamp[topic] = source_ns
        try:
            self._queue.put_nowait((_MSG, topic, bytes(data), time.time_ns() if recv_ns is None else recv_ns))
            return True
        except queue.Full:
            with self._lock:
                n = self.dropped_total[topic] = self.dropped_total.get(topic, 0) + 1
                ep = self._episode
                if ep is not None:
                    ep.dropped[topic] = ep.dropped.get(topic, 0) + 1
            if n == 1 or n % 100 == 0:
                self._log("error", f"recorder queue full ({self.config.queue_size}): dropped {n} message(s) "
                                   f"on {topic} so far")
            return False

    # ------------------------------------------------------------------------------------------ control
    def start(self, episode: int | None = None, prompt: str | None = None) -> Path:
        """Open a new episode bag; returns its directory. RecorderError when it cannot (already recording,
        unwritable directory, disk nearly full); the current episode, if any, keeps recording."""
        return self._call(self._do_start, episode, prompt)

    def stop(self, reason: str = "stopped") -> EpisodeSummary:
        return self._call(self._do_stop, reason)

    def label(self, success: bool, episode: int | None = None) -> Path:
        """Set the outcome of the current episode, or (after stop) of the last one, or of ``episode``."""
        return self._call(self._do_label, bool(success), episode)

    def stats(self) -> dict[str, Any]:
        ep = self._episode
        with self._lock:
            dropped = dict(self.dropped_total)
        return {"recording": ep is not None, "episode": ep.facts.episode if ep else None,
                "path": str(ep.bag.path) if ep else "", "queue": self._queue.qsize(),
                "queue_size": self.config.queue_size, "dropped": dropped,
                "written": _snapshot(ep.bag.counts) if ep else {}, "bytes_total": self.bytes_total,
                "written_total": self.written_total, "last_error": self.last_error,
                "last_episode": self._last.episode if self._last else None}

    @property
    def recording(self) -> bool:
        return self._episode is not None

    @property
    def last_episode(self) -> EpisodeSummary | None:
        return self._last

    def close(self, timeout: float = 10.0) -> None:
        """Stop the current episode (reason 'shutdown'), drain the queue and end the writer thread."""
        if self._closed:
            return
        self._closed = True
        self._accepting = False
        try:
            self._queue.put((_QUIT,), timeout=timeout)
        except queue.Full:
            self._log("error", "recorder queue stayed full during shutdown")
        self._thread.join(timeout)

    def __enter__(self) -> "EpisodeRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, fn, *args):
        if self._closed:
            raise RecorderError("the recorder is shut down")
        fut: Future = Future()
        if fn is self._do_start:
            self._accepting = True  # messages queued after this request go into the new bag
        try:
            self._queue.put((_CMD, fn, args, fut), timeout=self.config.control_timeout_s)
        except queue.Full:
            raise RecorderError(f"recorder queue stayed full for {self.config.control_timeout_s} s") from None
        try:
            return fut.result(timeout=self.config.control_timeout_s + 30.0)
        except TimeoutError:
            raise RecorderError("the writer thread did not answer within "
                                f"{self.config.control_timeout_s + 30.0:.0f} s (disk stalled?)") from None

    # ------------------------------------------------------------------------------------------ writer thread
    def _run(self) -> None:
        q = self._queue
        while True:
            try:
                item = q.get(timeout=0.05)
            except queue.Empty:
                item = None
            if item is not None:
                kind = item[0]
                if kind == _MSG:
                    try:
                        self._on_message(item[1], item[2], item[3])
                    except Exception as e:  # never let one message end the writer thread
                        self._error(f"recording {item[1]} failed: {e}")
                elif kind == _CMD:
                    _, fn, args, fut = item
                    try:
                        fut.set_result(fn(*args))
                    except Exception as e:
                        fut.set_exception(e if isinstance(e, RecorderError) else RecorderError(str(e)))
                else:
                    if self._episode is not None:
                        try:
                            self._do_stop("shutdown")
                        except Exception as e:
                            self._error(f"closing the episode at shutdown failed: {e}")
                    return
            ep = self._episode
            if ep is not None:
                now = time.monotonic()
                try:
                    ep.bag.maybe_flush(now)
                except Exception as e:
                    self._fail_episode(f"writing {ep.bag.path} failed: {e}")
                    continue
                if now - self._last_disk_check >= self.config.disk_check_period_s:
                    self._last_disk_check = now
                    low = self._disk_low()
                    if low:
                        self._fail_episode(f"disk nearly full, episode stopped: {low}")

    def _error(self, text: str) -> None:
        self.last_error = text
        self._log("error", text)

    def _disk_low(self) -> str:
        d = self.config.output_dir
        try:
            free = self._disk_free(d)
        except OSError as e:
            return f"cannot query free space of {d}: {e.strerror or e}"
        need = self.config.min_free_disk_mb * 2**20
        if free < need:
            return (f"{free / 2**20:.0f} MiB free on {d}, below recorder.min_free_disk_mb = "
                    f"{self.config.min_free_disk_mb}")
        return ""

    def _fail_episode(self, why: str) -> None:
        """End the current episode after an error, keeping what was written."""
        self._error(why)
        if self._episode is not None:
            self._do_stop(f"error: {why}")

    def _on_message(self, topic: str, data: bytes, recv_ns: int) -> None:
        t = self._topics[topic]
        c = self.config
        if c.auto_episodes and topic == c.episode_topic:
            self._on_episode_event(topic, data, recv_ns)
            return
        ep = self._episode
        if topic == c.command_topic and ep is not None and c.human_inputs:
            source = self._decode(topic, t.msgtype, data, "header", None) if "JointState" in t.msgtype else None
            if source is not None:
                human = source.frame_id in c.human_inputs
                if human:
                    segments = ep.facts.interventions + (not ep.human_driving)
                    ep.facts = replace(ep.facts, intervention_ticks=ep.facts.intervention_ticks + 1,
                                       interventions=segments)
                    if not ep.human_driving:
                        ep.bag.set_custom_data({K_INTERVENTIONS: str(segments)})
                ep.human_driving = human
        if self._cached(topic, t):
            self._cache[topic] = (data, recv_ns)
            if topic == c.prompt_topic:
                self._set_fact(K_PROMPT, self._decode(topic, "std_msgs/msg/String", data, "data", self._prompt))
            elif topic == c.beta_topic:
                beta = self._decode(topic, "std_msgs/msg/Float64", data, "data", None)
                if beta is not None:
                    self._set_fact(K_BETA, repr(float(beta)))
        self._write(topic, data, recv_ns)

    def _write(self, topic: str, data: bytes, recv_ns: int) -> None:
        ep = self._episode
        if ep is None:
            return
        t = self._topics[topic]
        try:
            ep.bag.write(topic, t.msgtype, data, recv_ns, t.qos)
        except (OSError, BagError) as e:
            self._fail_episode(f"writing {topic} to {ep.bag.path} failed: {getattr(e, 'strerror', None) or e}")
            return
        self.bytes_total += len(data)
        self.written_total += 1

    def _decode(self, topic: str, msgtype: str, data: bytes, attr: str, default):
        try:
            return getattr(typestore().deserialize_cdr(data, msgtype), attr)
        except Exception as e:
            self._error(f"cannot decode {topic} as {msgtype}: {e}")
            return default

    def _set_fact(self, key: str, value: str) -> None:
        if key == K_PROMPT:
            self._prompt = value
        else:
            self._beta = value
        ep = self._episode
        if key == K_PROMPT and ep is not None and ep.prompt_fixed:
            return  # a prompt arriving now belongs to the next episode (topics are not ordered with events)
        if ep is not None and ep.bag.custom_data.get(key) != value:
            ep.facts = replace(ep.facts, **{"prompt" if key == K_PROMPT else "beta": value})
            ep.bag.set_custom_data({key: value})

    def _on_episode_event(self, topic: str, data: bytes, recv_ns: int) -> None:
        text = self._decode(topic, "std_msgs/msg/String", data, "data", None)
        try:
            event = json.loads(text) if text is not None else None
        except ValueError as e:
            event = None
            self._error(f"episode event on {topic} is not JSON ({e}): {text[:200]!r}")
        kind = event.get("event") if isinstance(event, dict) else None
        if kind == "start":
            if self._episode is not None:
                self._log("warn", f"episode {self._episode.facts.episode} had no end event before the next "
                                  "start; closing it unlabelled")
                self._do_stop("next episode started without an end event")
            episode = event.get("episode")
            prompt = event.get("prompt")
            try:
                self._do_start(episode if isinstance(episode, int) and episode >= 0 else None,
                               prompt if isinstance(prompt, str) else None)
            except RecorderError as e:
                self._error(f"auto episode start failed: {e}")
            self._write(topic, data, recv_ns)
        elif kind == "end":
            self._write(topic, data, recv_ns)
            ep = self._episode
            if ep is None:
                self._log("warn", f"episode end event without a recording episode: {text[:200]!r}")
                return
            if event.get("episode") not in (None, ep.facts.episode):
                self._log("warn", f"end event for episode {event.get('episode')} while recording episode "
                                  f"{ep.facts.episode}; ending the recording one")
            success = event.get("success")
            if isinstance(success, bool):
                self._do_label(success, None)
            else:
                self._error(f"end event without a boolean 'success' ({success!r}); episode left unlabelled")
            self._do_stop(str(event.get("reason") or "end"))
        else:
            if event is not None:
                self._error(f"episode event on {topic} has no event 'start' or 'end': {text[:200]!r}")
            self._write(topic, data, recv_ns)

    # ------------------------------------------------------------------------------------------ commands
    def _do_start(self, episode: int | None, prompt: str | None) -> Path:
        try:
            return self._open_episode(episode, prompt)
        finally:
            self._accepting = self.config.auto_episodes or self._episode is not None

    def _open_episode(self, episode: int | None, prompt: str | None) -> Path:
        c = self.config
        cur = self._episode
        if cur is not None:
            raise RecorderError(f"already recording episode {cur.facts.episode} into {cur.bag.path}; "
                                "stop it first (it keeps recording)")
        out = Path(c.output_dir)
        try:
            ensure_writable_dir(out)
        except BagError as e:
            raise RecorderError(str(e)) from None
        low = self._disk_low()
        if low:
            raise RecorderError(f"not starting an episode: {low}")
        if episode is None:
            if self._next_index is None:
                self._next_index = max(episode_bags(out, c.station), default=-1) + 1
            episode = self._next_index
        if prompt is not None:
            self._prompt = prompt
        start_ns = time.time_ns()
        facts = EpisodeFacts(station=c.station, episode=episode, prompt=self._prompt, model=c.model,
                             beta=self._beta, operator=c.operator, start_ns=start_ns)
        bag = BagWriter(out / episode_dir_name(c.station, episode, start_ns / 1e9), facts.custom_data(),
                        c.compression, c.flush_period_s)
        try:
            bag.open()
        except BagError as e:
            raise RecorderError(str(e)) from None
        self._next_index = episode + 1
        with self._lock:
            self._episode = _Episode(facts, bag, prompt_fixed=prompt is not None)
        for topic, (data, recv_ns) in list(self._cache.items()):  # the state the episode starts in
            self._write(topic, data, max(recv_ns, start_ns))
        self._log("info", f"episode {episode} recording into {bag.path}")
        return bag.path

    def _do_stop(self, reason: str) -> EpisodeSummary:
        ep = self._episode
        if ep is None:
            raise RecorderError("not recording: no episode to stop")
        try:
            self._finalise_facts(ep, reason)
            ep.bag.close()
        except BagError as e:
            self._error(str(e))
            ep.bag.abort()
            return self._finish(ep, reason, complete=False)
        return self._finish(ep, reason, complete=True)

    def _finalise_facts(self, ep: _Episode, reason: str) -> None:
        with self._lock:
            dropped = sum(ep.dropped.values())
        ep.facts = replace(ep.facts, end_ns=time.time_ns(), end_reason=reason, dropped=dropped)
        ep.bag.set_custom_data(ep.facts.custom_data(), persist=False)

    def _finish(self, ep: _Episode, reason: str, complete: bool) -> EpisodeSummary:
        if not ep.facts.end_ns:
            ep.facts = replace(ep.facts, end_ns=time.time_ns(), end_reason=reason)
        with self._lock:
            self._episode = None
            dropped = dict(ep.dropped)
        self._accepting = self.config.auto_episodes
        summary = EpisodeSummary(ep.facts.episode, ep.bag.path, ep.facts.custom_data(), dict(ep.bag.counts),
                                 dropped, reason, complete)
        self._last = summary
        level = "info" if complete and not dropped else "warn"
        self._log(level, f"episode {summary.episode} stopped ({reason}): {summary.message_count} messages in "
                         f"{summary.path}" + (f", DROPPED {dropped}" if dropped else "")
                  + ("" if complete else f"; unfinished, run recap-bag-repair {summary.path}"))
        return summary

    def _do_label(self, success: bool, episode: int | None) -> Path:
        outcome = outcome_of(success)
        ep = self._episode
        if ep is not None and episode in (None, ep.facts.episode):
            ep.facts = replace(ep.facts, outcome=outcome)
            ep.bag.set_custom_data({K_OUTCOME: outcome})
            return ep.bag.path
        if episode is None:
            if self._last is None:
                raise RecorderError("no episode to label: none is recording and none was recorded since the "
                                    "recorder started")
            path = self._last.path
        else:
            path = episode_bags(self.config.output_dir, self.config.station).get(episode)
            if path is None:
                raise RecorderError(f"no bag for episode {episode} of station '{self.config.station}' under "
                                    f"{self.config.output_dir}")
        try:
            custom = update_custom_data(path, {K_OUTCOME: outcome})
        except BagError as e:
            raise RecorderError(f"cannot label {path}: {e}") from None
        if self._last is not None and self._last.path == path:
            self._last.custom_data = custom
        return path
