// EngineClient: the plugin's side of the unbake wire protocol. A worker thread owns the zmq DEALER
// socket; the audio thread talks to it only through two lock-free single-producer/single-consumer
// FIFOs (juce::AbstractFifo): input frames in, stem frames out. Session control (open, cancel)
// runs off the audio thread and is bounded by a timeout.
#pragma once

#include <juce_audio_processors/juce_audio_processors.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace unbake
{
// $UNBAKE_ENDPOINT, else the per-user ipc socket, as engine.endpoints.default_endpoint:
// ipc://$XDG_RUNTIME_DIR/unbake/engine.sock, /run/user/UID/unbake/engine.sock, $TMPDIR/unbake-UID/engine.sock
std::string defaultEndpoint();

class EngineClient
{
public:
    static constexpr int kMaxStems = 8;
    static constexpr int kMaxChannels = 2;
    static constexpr int kFifoFrames = 1 << 18;     // per FIFO (about 6 s at 44.1 kHz)
    static constexpr int kPushFrames = 16384;       // the most frames in one push
    static constexpr int kMaxPushesInFlight = 4;    // engine allows 16 pending per session
    static constexpr double kStallTimeoutS = 30.0;  // an in-flight push with no reply this long: engine lost

    struct SessionInfo
    {
        bool ok = false;
        std::string error;                      // why not, one line
        std::string session, model, device;
        int latencySamples = 0;                 // at the session's (host's) rate
        int sampleRate = 0, channels = 0;
        std::vector<std::string> stems;
    };

    EngineClient();
    ~EngineClient();

    // Off the audio thread, never concurrently with the audio-thread calls below. Cancels the
    // current session, empties both FIFOs, connects to `endpoint` and opens a session; returns
    // within about timeoutMs (1.5 s when nothing answers at the endpoint).
    SessionInfo open (const std::string& endpoint, const std::string& model, int sampleRate, int channels, int timeoutMs);
    void cancel(); // ends the current session (no wait for the engine)

    // Audio thread (wait-free).
    int writeInput (const float* const* channels, int numChannels, int startFrame, int numFrames);
    int availableStems() const noexcept { return outFifo.getNumReady(); }
    // out[c][outStart + k] = sum over stems s of gains[s] * stem_s[c][k], k < numFrames (<= availableStems())
    void mixStems (int numFrames, const float* gains, float* const* out, int numChannels, int outStart) noexcept;
    void discardStems (int numFrames) noexcept;
    bool failed() const noexcept { return failedFlag.load(); }
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
    void setStatus (const std::string& s);
    void fail (const std::string& why);

    // FIFOs (planar float32)
    juce::AbstractFifo inFifo { kFifoFrames }, outFifo { kFifoFrames };
    std::vector<std::vector<float>> inBuf, outBuf; // [channel], [stem * kMaxChannels + channel]

    std::atomic<bool> quit { false }, failedFlag { false }, sessionOpen { false };

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
