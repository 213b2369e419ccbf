// EngineClient: the plugin's side of the unbake wire protocol. A worker thread owns the zmq DEALER
// socket; the audio thread talks to it only through two lock-free single-producer/single-consumer
// FIFOs (juce::AbstractFifo): input frames in, stem frames out. Session control (open, cancel)
// runs off the audio thread and is bounded by a timeout.
#pragma once

#include <juce_audio_processors/juce_audio_processors.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace unbake
{
// $UNBAKE_ENDPOINT, else the per-user ipc socket, as engine.endpoints.default_endpoint:
// ipc://$XDG_RUNTIME_DIR/unbake/engine.sock, /run/user/UID/unbake/engine.sock, $TMPDIR/unbake-UID/engine.sock
std::string defaultEndpoint();

// The folder of unbake's runtime files (engine.endpoints.runtime_dir, without its checks), and the
// file a daemon holds locked while it serves `endpoint` (engine.endpoints.lock_path).
std::string runtimeDir();
std::string lockPath (const std::string& endpoint);

class EngineClient
{
public:
    using Clock = std::chrono::steady_clock;
    static constexpr int kMaxStems = 8;
    static constexpr int kMaxChannels = 2;
    static constexpr int kFifoFrames = 1 << 18;     // per FIFO (about 6 s at 44.1 kHz)
    static constexpr int kPushFrames = 16384;       // the most frames in one push
    static constexpr int kMaxPushesInFlight = 4;    // engine allows 16 pending per session
    static constexpr double kStallTimeoutS = 30.0;  // an in-flight push with no reply this long: engine lost

    static constexpr double kProbeS = 0.5;          // a hello probe while an engine starts
    static constexpr int kIdleExitS = 600;          // an autostarted engine exits when idle this long

    struct OpenRequest
    {
        std::string endpoint, model;
        int sampleRate = 0, channels = 0;
        std::vector<std::pair<std::string, double>> options; // the open request's options
        int timeoutMs = 60000;                  // the whole open, an engine's start included
        // Autostart: when nothing answers at the endpoint (ipc, or tcp on a loopback address) and
        // this names an executable, run `<engineCommand> serve --endpoint <endpoint> --idle-exit-s
        // 600` detached (as plugin_bridge.client does: one start per endpoint, serialised on
        // flock(<lockPath>.start)), logging to engine.log beside the lock, and wait for it at most
        // startWaitMs (then the open fails with "starting"; a later open finds it, and never
        // starts a second one while the first is alive).
        std::string engineCommand;
        int startWaitMs = 60000;
    };

    struct SessionInfo
    {
        bool ok = false;
        std::string error;                      // why not, one line
        std::string session, model, device;     // model: the one asked for until the engine names it
        int latencySamples = 0;                 // at the session's (host's) rate
        int sampleRate = 0, channels = 0;
        std::vector<std::string> stems;
    };

    EngineClient();
    ~EngineClient();

    // Off the audio thread, never concurrently with the audio-thread calls below. Cancels the
    // current session, empties both FIFOs, connects to the endpoint (starting an engine there when
    // asked to) and opens a session; returns within about timeoutMs (1.5 s when nothing answers
    // at the endpoint and no engine is to be started).
    SessionInfo open (const OpenRequest& request);
    void cancel(); // ends the current session (no wait for the engine)

    // Audio thread (wait-free).
    int writeInput (const float* const* channels, int numChannels, int startFrame, int numFrames);
    int availableStems() const noexcept { return outFifo.getNumReady(); }
    // out[c][outStart + k] = sum over stems s of gains[s] * stem_s[c][k], k < numFrames (<= availableStems())
    void mixStems (int numFrames, const float* gains, float* const* out, int numChannels, int outStart) noexcept;
    // The same to several outputs at once (the main output and the aux buses), then the frames are
    // gone: for each output d with outs[d] != nullptr, outs[d][c][outStart + k] = sum over stems s
    // of gains[d * kMaxStems + s] * stem_s[c][k].
    void mixStems (int numFrames, int numOutputs, const float* gains, float* const* const* outs, int numChannels,
                   int outStart) noexcept;
    void discardStems (int numFrames) noexcept;
    bool failed() const noexcept { return failedFlag.load(); }
    // Offline only (it blocks): returns once availableStems() >= frames, the client failed, or
    // timeoutMs passed; true when the stems are there. Woken by the worker (no polling: a render
    // leaves the CPU to the engine).
    bool waitForStems (int frames, double timeoutMs);
    bool hasSession() const noexcept { return sessionOpen.load(); }

    std::string status() const; // one line, for the log and the editor (not real time)

private:
    void run();
    void runCommand (std::function<void()> cmd);
    // worker thread only
    void pump();
    void receiveAll (int pollMs);
    void handle (std::vector<std::string>& parts);
    void flushPending();
    bool startEngine (const OpenRequest& r, Clock::time_point deadline, const std::function<bool (double)>& probe,
                      std::string& why);
    void reapEngine();
    void setStatus (const std::string& s);
    void fail (const std::string& why);

    // FIFOs (planar float32)
    juce::AbstractFifo inFifo { kFifoFrames }, outFifo { kFifoFrames };
    std::vector<std::vector<float>> inBuf, outBuf; // [channel], [stem * kMaxChannels + channel]

    std::atomic<bool> quit { false }, failedFlag { false }, sessionOpen { false };

    // offline waits for stems (waitForStems): the worker notifies after each write to outFifo
    std::mutex stemsMutex;
    std::condition_variable stemsCv;
    void notifyStems();

    // commands: run on the worker thread, the caller waits
    std::mutex cmdMutex;
    std::condition_variable cmdCv;
    std::function<void()> pendingCmd;
    bool cmdDone = false;

    mutable std::mutex statusMutex;
    std::string statusLine { "not connected" };

    // worker-thread state
    struct Impl;
    std::unique_ptr<Impl> impl;
    std::thread worker;
};
} // namespace unbake
