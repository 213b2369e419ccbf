#include "EngineClient.h"
#include "Protocol.h"

#include <zmq.hpp>
#include <zmq_addon.hpp>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <set>

#if JUCE_LINUX || JUCE_MAC || JUCE_BSD
 #include <unistd.h>
#endif

namespace unbake
{
using Clock = std::chrono::steady_clock;

namespace
{
bool writableDir (const std::string& path)
{
#if JUCE_LINUX || JUCE_MAC || JUCE_BSD
    return ! path.empty() && juce::File (path).isDirectory() && access (path.c_str(), W_OK | X_OK) == 0;
#else
    return ! path.empty() && juce::File (path).isDirectory();
#endif
}

double secondsSince (Clock::time_point t) { return std::chrono::duration<double> (Clock::now() - t).count(); }
} // namespace

std::string defaultEndpoint()
{
    if (const char* e = std::getenv ("UNBAKE_ENDPOINT"); e != nullptr && *e != 0)
        return e;
#if JUCE_LINUX || JUCE_MAC || JUCE_BSD
    const auto uid = std::to_string ((long) getuid());
    std::vector<std::string> parents;
    if (const char* x = std::getenv ("XDG_RUNTIME_DIR"); x != nullptr && *x != 0)
        parents.emplace_back (x);
    parents.push_back ("/run/user/" + uid);
    for (const auto& p : parents)
        if (writableDir (p))
            return "ipc://" + p + "/unbake/engine.sock";
    std::string tmp = "/tmp";
    if (const char* t = std::getenv ("TMPDIR"); t != nullptr && *t != 0 && writableDir (t))
        tmp = t;
    while (tmp.size() > 1 && tmp.back() == '/')
        tmp.pop_back();
    return "ipc://" + tmp + "/unbake-" + uid + "/engine.sock";
#else
    return "tcp://127.0.0.1:5555"; // TODO: the Windows default of engine.endpoints
#endif
}

struct EngineClient::Impl
{
    zmq::context_t ctx { 1 };
    std::unique_ptr<zmq::socket_t> socket;
    std::unique_ptr<zmq::socket_t> monitor; // ZMQ_EVENT_DISCONNECTED of `socket`: the engine went away
    int monitors = 0;

    void closeSocket()
    {
        if (socket != nullptr && monitor != nullptr)
            zmq_socket_monitor (socket->handle(), nullptr, 0);
        monitor.reset();
        socket.reset();
    }

    void openSocket (const std::string& ep)
    {
        closeSocket();
        socket = std::make_unique<zmq::socket_t> (ctx, zmq::socket_type::dealer);
        socket->set (zmq::sockopt::linger, 0);
        socket->set (zmq::sockopt::immediate, 1); // no queueing for an engine that is not there
        socket->set (zmq::sockopt::reconnect_ivl, 100);
        const auto addr = "inproc://unbake-monitor-" + std::to_string (reinterpret_cast<uintptr_t> (this)) + "-"
                          + std::to_string (++monitors);
        if (zmq_socket_monitor (socket->handle(), addr.c_str(), ZMQ_EVENT_DISCONNECTED) == 0)
        {
            monitor = std::make_unique<zmq::socket_t> (ctx, zmq::socket_type::pair);
            monitor->set (zmq::sockopt::linger, 0);
            monitor->connect (addr);
        }
        socket->connect (ep);
    }

    // true when the monitor reported a disconnect since the last call
    bool disconnected()
    {
        bool any = false;
        while (monitor != nullptr)
        {
            std::vector<zmq::message_t> event;
            if (! zmq::recv_multipart (*monitor, std::back_inserter (event), zmq::recv_flags::dontwait))
                break;
            if (! event.empty() && event[0].size() >= 2)
            {
                uint16_t id;
                std::memcpy (&id, event[0].data(), 2);
                any |= (id & ZMQ_EVENT_DISCONNECTED) != 0;
            }
        }
        return any;
    }
    std::string endpoint;
    int64_t nextId = 1;

    // the current session
    std::string session;
    int channels = 0, numStems = 0;
    int64_t nextStart = 0;                 // the next stem frame expected
    std::set<int64_t> inFlight;            // push ids without their `done`
    Clock::time_point lastAlive;           // the last reply of this session
    std::vector<float> sendBuf;

    struct Block { std::vector<float> data; int frames = 0, offset = 0; }; // [stem][channel][frames]
    std::deque<Block> pending;             // stems received, not yet in the FIFO
};

EngineClient::EngineClient() : impl (std::make_unique<Impl>())
{
    inBuf.assign (kMaxChannels, std::vector<float> ((size_t) kFifoFrames, 0.0f));
    outBuf.assign (kMaxStems * kMaxChannels, std::vector<float> ((size_t) kFifoFrames, 0.0f));
    worker = std::thread ([this] { run(); });
}

EngineClient::~EngineClient()
{
    cancel();
    runCommand ([this] { impl->closeSocket(); });
    quit = true;
    worker.join();
}

void EngineClient::setStatus (const std::string& s)
{
    {
        std::lock_guard<std::mutex> lk (statusMutex);
        if (statusLine == s)
            return;
        statusLine = s;
    }
    juce::Logger::writeToLog ("unbake: " + juce::String (s));
}

std::string EngineClient::status() const
{
    std::lock_guard<std::mutex> lk (statusMutex);
    return statusLine;
}

void EngineClient::fail (const std::string& why)
{
    failedFlag = true;
    setStatus (why);
}

void EngineClient::runCommand (std::function<void()> cmd)
{
    std::unique_lock<std::mutex> lk (cmdMutex);
    cmdCv.wait (lk, [this] { return ! pendingCmd; }); // one command at a time
    pendingCmd = std::move (cmd);
    cmdDone = false;
    cmdCv.wait (lk, [this] { return cmdDone; });
}

void EngineClient::run()
{
    while (! quit)
    {
        {
            std::unique_lock<std::mutex> lk (cmdMutex);
            if (pendingCmd)
            {
                auto cmd = std::move (pendingCmd);
                lk.unlock();
                try { cmd(); } catch (const std::exception& e) { fail (std::string ("internal error: ") + e.what()); }
                lk.lock();
                pendingCmd = nullptr;
                cmdDone = true;
                cmdCv.notify_all();
                continue;
            }
        }
        if (impl->socket == nullptr || impl->session.empty() || failedFlag)
        {
            std::this_thread::sleep_for (std::chrono::milliseconds (2));
            continue;
        }
        try
        {
            pump();
            receiveAll (1);
            flushPending();
            if (impl->disconnected())
                fail ("the engine at " + impl->endpoint + " went away mid-stream; output is silence");
            if (! impl->inFlight.empty() && secondsSince (impl->lastAlive) > kStallTimeoutS)
                fail ("the engine stopped answering at " + impl->endpoint + " (no reply for "
                      + std::to_string ((int) kStallTimeoutS) + " s); output is silence");
        }
        catch (const std::exception& e)
        {
            fail (std::string ("connection error: ") + e.what());
        }
    }
}

void EngineClient::pump()
{
    auto& I = *impl;
    while ((int) I.inFlight.size() < kMaxPushesInFlight)
    {
        const int ready = inFifo.getNumReady();
        if (ready <= 0)
            return;
        const int n = std::min (ready, kPushFrames);
        I.sendBuf.resize ((size_t) (I.channels * n));
        int s1, n1, s2, n2;
        inFifo.prepareToRead (n, s1, n1, s2, n2);
        for (int c = 0; c < I.channels; ++c)
        {
            float* dst = I.sendBuf.data() + (size_t) c * (size_t) n;
            std::memcpy (dst, inBuf[(size_t) c].data() + s1, sizeof (float) * (size_t) n1);
            if (n2 > 0)
                std::memcpy (dst + n1, inBuf[(size_t) c].data() + s2, sizeof (float) * (size_t) n2);
        }
        const int64_t id = I.nextId++;
        const auto header = wire::push (id, I.session, I.channels, n);
        // little-endian float32 on the wire: every platform this builds for is little-endian
        if (! I.socket->send (zmq::buffer (header), zmq::send_flags::sndmore | zmq::send_flags::dontwait)
            || ! I.socket->send (zmq::buffer (I.sendBuf.data(), sizeof (float) * I.sendBuf.size()), zmq::send_flags::dontwait))
        {
            // not connected (ZMQ_IMMEDIATE) or the pipe is full: keep the frames, try again later
            if (secondsSince (I.lastAlive) > kStallTimeoutS)
                fail ("no engine at " + I.endpoint + "; output is silence");
            return;
        }
        inFifo.finishedRead (n);
        if (I.inFlight.empty())
            I.lastAlive = Clock::now();
        I.inFlight.insert (id);
    }
}

void EngineClient::receiveAll (int pollMs)
{
    auto& I = *impl;
    zmq::pollitem_t item { I.socket->handle(), 0, ZMQ_POLLIN, 0 };
    if (zmq::poll (&item, 1, std::chrono::milliseconds (pollMs)) <= 0)
        return;
    for (int i = 0; i < 256; ++i)
    {
        std::vector<zmq::message_t> msgs;
        if (! zmq::recv_multipart (*I.socket, std::back_inserter (msgs), zmq::recv_flags::dontwait))
            return;
        std::vector<std::string> parts;
        parts.reserve (msgs.size());
        for (auto& m : msgs)
            parts.emplace_back (static_cast<const char*> (m.data()), m.size());
        handle (parts);
    }
}

void EngineClient::handle (std::vector<std::string>& parts)
{
    auto& I = *impl;
    if (parts.empty())
        return;
    const auto r = wire::parseReply (parts[0].data(), parts[0].size());
    if (! r.valid || I.inFlight.count (r.re) == 0)
        return; // not ours (an old session's reply, a reply to a cancel)
    I.lastAlive = Clock::now();
    if (r.kind == "progress")
        return;
    if (r.kind == "error")
    {
        I.inFlight.erase (r.re);
        fail ("engine error " + r.code + ": " + r.message + "; output is silence");
        return;
    }
    if (r.kind == "done")
    {
        I.inFlight.erase (r.re);
        return;
    }
    if (r.kind != "stems")
        return;
    if (r.session != I.session || r.channels != I.channels || (int) r.stems.size() != I.numStems
        || (int) parts.size() != 1 + I.numStems || r.frames < 0 || r.start != I.nextStart)
    {
        fail ("engine sent stems this session did not expect (start " + std::to_string (r.start) + ", expected "
              + std::to_string (I.nextStart) + "); output is silence");
        return;
    }
    const auto frames = (int) r.frames;
    if (frames == 0)
        return;
    Impl::Block b;
    b.frames = frames;
    b.data.resize ((size_t) I.numStems * (size_t) I.channels * (size_t) frames);
    for (int s = 0; s < I.numStems; ++s)
    {
        const auto& p = parts[(size_t) (1 + s)];
        const size_t bytes = sizeof (float) * (size_t) I.channels * (size_t) frames;
        if (p.size() != bytes)
        {
            fail ("engine sent a stems frame of the wrong size; output is silence");
            return;
        }
        std::memcpy (b.data.data() + (size_t) s * (size_t) I.channels * (size_t) frames, p.data(), bytes);
    }
    I.nextStart += frames;
    I.pending.push_back (std::move (b));
}

void EngineClient::flushPending()
{
    auto& I = *impl;
    while (! I.pending.empty())
    {
        auto& b = I.pending.front();
        const int n = std::min (outFifo.getFreeSpace(), b.frames - b.offset);
        if (n <= 0)
            return;
        int s1, n1, s2, n2;
        outFifo.prepareToWrite (n, s1, n1, s2, n2);
        for (int s = 0; s < I.numStems; ++s)
            for (int c = 0; c < I.channels; ++c)
            {
                const float* src = b.data.data() + ((size_t) s * (size_t) I.channels + (size_t) c) * (size_t) b.frames
                                   + (size_t) b.offset;
                auto& dst = outBuf[(size_t) (s * kMaxChannels + c)];
                std::memcpy (dst.data() + s1, src, sizeof (float) * (size_t) n1);
                if (n2 > 0)
                    std::memcpy (dst.data() + s2, src + n1, sizeof (float) * (size_t) n2);
            }
        outFifo.finishedWrite (n);
        b.offset += n;
        if (b.offset == b.frames)
            I.pending.pop_front();
    }
}

EngineClient::SessionInfo EngineClient::open (const std::string& endpoint, const std::string& model, int sampleRate,
                                              int channels, int timeoutMs)
{
    SessionInfo info;
    if (channels < 1 || channels > kMaxChannels)
    {
        info.error = "unbake separates mono or stereo audio, not " + std::to_string (channels) + " channels";
        setStatus (info.error);
        return info;
    }
    runCommand ([&] {
        auto& I = *impl;
        const auto deadline = Clock::now() + std::chrono::milliseconds (timeoutMs);
        // end the old session; a new socket drops whatever the old one still had queued
        if (I.socket != nullptr && ! I.session.empty())
        {
            const auto h = wire::cancel (I.nextId++, I.session);
            (void) I.socket->send (zmq::buffer (h), zmq::send_flags::dontwait);
        }
        sessionOpen = false;
        I.session.clear();
        I.inFlight.clear();
        I.pending.clear();
        I.nextStart = 0;
        inFifo.reset();
        outFifo.reset();
        failedFlag = false;
        I.closeSocket();

        I.endpoint = endpoint;
        // an ipc socket file that is not there: no engine, no need to wait for one
        if (endpoint.rfind ("ipc:///", 0) == 0 && ! juce::File (juce::String (endpoint.substr (6))).exists())
        {
            info.error = "no engine at " + endpoint + " (start one with `unbake serve`); output is silence";
            return;
        }
        try { I.openSocket (endpoint); }
        catch (const zmq::error_t& e)
        {
            I.closeSocket();
            info.error = "bad endpoint " + endpoint + ": " + e.what();
            return;
        }

        // send, retrying while the connection comes up (at most 1.5 s or the deadline)
        auto sendWithin = [&] (const std::string& header, double seconds) {
            const auto until = std::min (deadline, Clock::now() + std::chrono::milliseconds ((int) (seconds * 1000)));
            while (true)
            {
                if (I.socket->send (zmq::buffer (header), zmq::send_flags::dontwait))
                    return true;
                if (Clock::now() >= until)
                    return false;
                std::this_thread::sleep_for (std::chrono::milliseconds (5));
            }
        };
        // the terminal reply to `id` (progress keeps waiting, up to the deadline)
        auto await = [&] (int64_t id, wire::Reply& out) {
            while (Clock::now() < deadline)
            {
                zmq::pollitem_t item { I.socket->handle(), 0, ZMQ_POLLIN, 0 };
                const auto left = std::chrono::duration_cast<std::chrono::milliseconds> (deadline - Clock::now());
                if (zmq::poll (&item, 1, std::chrono::milliseconds (std::max<long> (1, std::min<long> (50, (long) left.count())))) <= 0)
                    continue;
                std::vector<zmq::message_t> msgs;
                if (! zmq::recv_multipart (*I.socket, std::back_inserter (msgs), zmq::recv_flags::dontwait) || msgs.empty())
                    continue;
                auto r = wire::parseReply (msgs[0].data(), msgs[0].size());
                if (! r.valid || r.re != id || r.kind == "progress")
                    continue;
                out = std::move (r);
                return true;
            }
            return false;
        };

        const int64_t helloId = I.nextId++;
        wire::Reply hello;
        if (! sendWithin (wire::hello (helloId, "unbake-vst3"), 1.5) || ! await (helloId, hello))
        {
            info.error = "no engine at " + endpoint + " (start one with `unbake serve`); output is silence";
            return;
        }
        if (hello.kind != "hello")
        {
            info.error = "engine at " + endpoint + " refused hello: " + hello.code + " " + hello.message;
            return;
        }
        info.device = hello.device;

        const int64_t openId = I.nextId++;
        wire::Reply ready;
        if (! sendWithin (wire::open (openId, model, sampleRate, channels), 1.5) || ! await (openId, ready))
        {
            info.error = "the engine at " + endpoint + " did not open " + model + " within "
                         + std::to_string (timeoutMs / 1000) + " s; output is silence";
            return;
        }
        if (ready.kind != "ready")
        {
            info.error = "engine error " + ready.code + ": " + ready.message;
            return;
        }
        if (ready.session.empty() || ready.stems.empty() || (int) ready.stems.size() > kMaxStems
            || ready.latencySamples < 0)
        {
            info.error = "engine's ready reply is not usable (" + std::to_string (ready.stems.size()) + " stems)";
            return;
        }
        I.session = ready.session;
        I.channels = channels;
        I.numStems = (int) ready.stems.size();
        I.lastAlive = Clock::now();
        info.ok = true;
        info.session = ready.session;
        info.model = ready.model.empty() ? model : ready.model;
        info.latencySamples = (int) ready.latencySamples;
        info.sampleRate = sampleRate;
        info.channels = channels;
        info.stems = ready.stems;
        sessionOpen = true;
        (void) I.disconnected(); // events of the probe's own connection attempts
    });
    if (info.ok)
    {
        std::string stems;
        for (auto& s : info.stems)
            stems += (stems.empty() ? "" : ",") + s;
        setStatus ("connected to " + endpoint + ": " + info.model + " on " + info.device + ", stems " + stems
                   + ", latency " + std::to_string (info.latencySamples) + " samples at " + std::to_string (sampleRate)
                   + " Hz (" + std::to_string (1000.0 * info.latencySamples / sampleRate) + " ms)");
    }
    else
    {
        failedFlag = true;
        setStatus (info.error);
    }
    return info;
}

void EngineClient::cancel()
{
    runCommand ([this] {
        auto& I = *impl;
        if (I.socket != nullptr && ! I.session.empty())
        {
            const auto h = wire::cancel (I.nextId++, I.session);
            (void) I.socket->send (zmq::buffer (h), zmq::send_flags::dontwait);
        }
        I.session.clear();
        I.inFlight.clear();
        I.pending.clear();
        sessionOpen = false;
    });
}

int EngineClient::writeInput (const float* const* channels, int numChannels, int startFrame, int numFrames)
{
    const int n = std::min (numFrames, inFifo.getFreeSpace());
    if (n <= 0)
        return 0;
    int s1, n1, s2, n2;
    inFifo.prepareToWrite (n, s1, n1, s2, n2);
    for (int c = 0; c < std::min (numChannels, kMaxChannels); ++c)
    {
        const float* src = channels[c] + startFrame;
        std::memcpy (inBuf[(size_t) c].data() + s1, src, sizeof (float) * (size_t) n1);
        if (n2 > 0)
            std::memcpy (inBuf[(size_t) c].data() + s2, src + n1, sizeof (float) * (size_t) n2);
    }
    inFifo.finishedWrite (n);
    return n;
}

void EngineClient::mixStems (int numFrames, const float* gains, float* const* out, int numChannels, int outStart) noexcept
{
    const int numStems = (int) impl->numStems; // set before the session opened; constant while it runs
    int s1, n1, s2, n2;
    outFifo.prepareToRead (numFrames, s1, n1, s2, n2);
    for (int c = 0; c < numChannels; ++c)
    {
        float* dst = out[c] + outStart;
        std::fill (dst, dst + n1 + n2, 0.0f);
        for (int s = 0; s < numStems; ++s)
        {
            const float g = gains[s];
            if (g == 0.0f)
                continue;
            const float* src = outBuf[(size_t) (s * kMaxChannels + c)].data();
            for (int k = 0; k < n1; ++k)
                dst[k] += g * src[s1 + k];
            for (int k = 0; k < n2; ++k)
                dst[n1 + k] += g * src[s2 + k];
        }
    }
    outFifo.finishedRead (n1 + n2);
}

void EngineClient::discardStems (int numFrames) noexcept
{
    int s1, n1, s2, n2;
    outFifo.prepareToRead (numFrames, s1, n1, s2, n2);
    outFifo.finishedRead (n1 + n2);
}
} // namespace unbake
