#include "EngineClient.h"
#include "Protocol.h"

#include <zmq.hpp>
#include <zmq_addon.hpp>

#include <cctype>
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <set>

#if JUCE_LINUX || JUCE_MAC || JUCE_BSD
 #define UNBAKE_POSIX 1
 #include <cerrno>
 #include <csignal>
 #include <fcntl.h>
 #include <spawn.h>
 #include <sys/file.h>
 #include <sys/stat.h>
 #include <sys/wait.h>
 #include <unistd.h>
extern char** environ;
#else
 #define UNBAKE_POSIX 0
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

std::string runtimeDir()
{
#if UNBAKE_POSIX
    const auto uid = std::to_string ((long) getuid());
    std::vector<std::string> parents;
    if (const char* x = std::getenv ("XDG_RUNTIME_DIR"); x != nullptr && *x != 0)
        parents.emplace_back (x);
    parents.push_back ("/run/user/" + uid);
    for (const auto& p : parents)
        if (writableDir (p))
            return p + "/unbake";
    std::string tmp = "/tmp";
    if (const char* t = std::getenv ("TMPDIR"); t != nullptr && *t != 0 && writableDir (t))
        tmp = t;
    while (tmp.size() > 1 && tmp.back() == '/')
        tmp.pop_back();
    return tmp + "/unbake-" + uid;
#else
    return juce::File::getSpecialLocation (juce::File::tempDirectory).getChildFile ("unbake").getFullPathName().toStdString();
#endif
}

std::string defaultEndpoint()
{
    if (const char* e = std::getenv ("UNBAKE_ENDPOINT"); e != nullptr && *e != 0)
        return e;
#if UNBAKE_POSIX
    return "ipc://" + runtimeDir() + "/engine.sock";
#else
    return "tcp://127.0.0.1:5555"; // TODO: the Windows default of engine.endpoints
#endif
}

std::string lockPath (const std::string& endpoint)
{
    if (endpoint.rfind ("ipc://", 0) == 0)
        return endpoint.substr (6) + ".lock";
    std::string safe;
    for (char ch : endpoint)
        safe += std::isalnum (static_cast<unsigned char> (ch)) ? ch : '-';
    return runtimeDir() + "/" + safe + ".lock";
}

namespace
{
// an engine may be started for ipc:// and for tcp:// on a loopback address (engine.endpoints.is_loopback)
bool startable (const std::string& endpoint)
{
    if (endpoint.rfind ("ipc://", 0) == 0)
        return true;
    if (endpoint.rfind ("tcp://", 0) != 0)
        return false;
    auto host = endpoint.substr (6, endpoint.rfind (':') == std::string::npos ? std::string::npos : endpoint.rfind (':') - 6);
    if (host.size() >= 2 && host.front() == '[' && host.back() == ']')
        host = host.substr (1, host.size() - 2);
    return host == "localhost" || host == "::1" || host.rfind ("127.", 0) == 0;
}

std::string parentOf (const std::string& path)
{
    const auto slash = path.rfind ('/');
    return slash == std::string::npos ? std::string (".") : slash == 0 ? std::string ("/") : path.substr (0, slash);
}
} // namespace

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
    long spawnedPid = 0;            // the engine this client started, until it exits (reaped)
    std::string spawnedEndpoint;

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
    runCommand ([this] { impl->closeSocket(); reapEngine(); });
    quit = true;
    worker.join();
}

// worker thread: a started engine that has exited is reaped (no zombie); one still running is left
// alone (it serves other clients too and exits by itself when idle)
void EngineClient::reapEngine()
{
#if UNBAKE_POSIX
    if (impl->spawnedPid > 0)
    {
        int st = 0;
        if (waitpid ((pid_t) impl->spawnedPid, &st, WNOHANG) != 0)
            impl->spawnedPid = 0;
    }
#endif
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
    notifyStems();
}

void EngineClient::notifyStems()
{
    {
        const std::lock_guard<std::mutex> lk (stemsMutex); // a waiter between its check and its wait is not missed
    }
    stemsCv.notify_all();
}

bool EngineClient::waitForStems (int frames, double timeoutMs)
{
    std::unique_lock<std::mutex> lk (stemsMutex);
    return stemsCv.wait_for (lk, std::chrono::duration<double, std::milli> (std::max (0.0, timeoutMs)),
                             [&] { return availableStems() >= frames || failed(); })
           && availableStems() >= frames;
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
            reapEngine();
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
    bool wrote = false;
    while (! I.pending.empty())
    {
        auto& b = I.pending.front();
        const int n = std::min (outFifo.getFreeSpace(), b.frames - b.offset);
        if (n <= 0)
            break;
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
        wrote = true;
        b.offset += n;
        if (b.offset == b.frames)
            I.pending.pop_front();
    }
    if (wrote)
        notifyStems();
}

EngineClient::SessionInfo EngineClient::open (const OpenRequest& r)
{
    SessionInfo info;
    info.model = r.model;
    const auto& endpoint = r.endpoint;
    if (r.channels < 1 || r.channels > kMaxChannels)
    {
        info.error = "unbake separates mono or stereo audio, not " + std::to_string (r.channels) + " channels";
        failedFlag = true;
        setStatus (info.error);
        return info;
    }
    runCommand ([&] {
        auto& I = *impl;
        const auto deadline = Clock::now() + std::chrono::milliseconds (r.timeoutMs);
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
        reapEngine();

        I.endpoint = endpoint;

        // send, retrying while the connection comes up (at most `seconds` or the deadline)
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
        // the terminal reply to `id` (progress keeps waiting, up to `until`)
        auto await = [&] (int64_t id, wire::Reply& out, Clock::time_point until) {
            until = std::min (until, deadline);
            while (Clock::now() < until)
            {
                zmq::pollitem_t item { I.socket->handle(), 0, ZMQ_POLLIN, 0 };
                const auto left = std::chrono::duration_cast<std::chrono::milliseconds> (until - Clock::now());
                if (zmq::poll (&item, 1, std::chrono::milliseconds (std::max<long> (1, std::min<long> (50, (long) left.count())))) <= 0)
                    continue;
                std::vector<zmq::message_t> msgs;
                if (! zmq::recv_multipart (*I.socket, std::back_inserter (msgs), zmq::recv_flags::dontwait) || msgs.empty())
                    continue;
                auto reply = wire::parseReply (msgs[0].data(), msgs[0].size());
                if (! reply.valid || reply.re != id || reply.kind == "progress")
                    continue;
                out = std::move (reply);
                return true;
            }
            return false;
        };
        // hello on a fresh socket: the send within sendS, the reply by `until`; false when nothing
        // answers (an ipc socket file that is not there: no engine, no need to wait for one)
        wire::Reply hello;
        auto sayHello = [&] (double sendS, Clock::time_point until) {
            I.closeSocket();
            if (endpoint.rfind ("ipc:///", 0) == 0 && ! juce::File (juce::String (endpoint.substr (6))).exists())
                return false;
            I.openSocket (endpoint);
            const int64_t helloId = I.nextId++;
            return sendWithin (wire::hello (helloId, "unbake-vst3"), sendS) && await (helloId, hello, until);
        };
        const std::string noEngine = "no engine at " + endpoint + " (start one with `unbake serve`"
                                     + (startable (endpoint) ? ", or set engine_command or $UNBAKE_EXECUTABLE" : "")
                                     + "); output is silence";
        try
        {
            bool answered = sayHello (1.5, deadline);
            if (! answered && ! r.engineCommand.empty() && startable (endpoint))
            {
                auto probe = [&] (double seconds) {
                    return sayHello (seconds, Clock::now() + std::chrono::milliseconds ((int) (seconds * 1000)));
                };
                std::string why;
                const auto startBy = std::min (deadline, Clock::now() + std::chrono::milliseconds (r.startWaitMs));
                if (! startEngine (r, startBy, probe, why))
                {
                    info.error = why;
                    return;
                }
                answered = true; // startEngine's last probe got `hello`
            }
            if (! answered)
            {
                info.error = noEngine;
                return;
            }
        }
        catch (const zmq::error_t& e)
        {
            I.closeSocket();
            info.error = "bad endpoint " + endpoint + ": " + e.what();
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
        if (! sendWithin (wire::open (openId, r.model, r.sampleRate, r.channels, r.options), 1.5)
            || ! await (openId, ready, deadline))
        {
            info.error = "the engine at " + endpoint + " did not open " + r.model + " within "
                         + std::to_string (r.timeoutMs / 1000) + " s; output is silence";
            return;
        }
        if (ready.kind != "ready")
        {
            info.error = "engine error " + ready.code + ": " + ready.message + "; output is silence";
            return;
        }
        if (ready.session.empty() || ready.stems.empty() || (int) ready.stems.size() > kMaxStems
            || ready.latencySamples < 0)
        {
            info.error = "engine's ready reply is not usable (" + std::to_string (ready.stems.size()) + " stems)";
            return;
        }
        I.session = ready.session;
        I.channels = r.channels;
        I.numStems = (int) ready.stems.size();
        I.lastAlive = Clock::now();
        info.ok = true;
        info.session = ready.session;
        info.model = ready.model.empty() ? r.model : ready.model;
        info.latencySamples = (int) ready.latencySamples;
        info.sampleRate = r.sampleRate;
        info.channels = r.channels;
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
                   + ", latency " + std::to_string (info.latencySamples) + " samples at " + std::to_string (r.sampleRate)
                   + " Hz (" + std::to_string (1000.0 * info.latencySamples / r.sampleRate) + " ms)");
    }
    else
    {
        failedFlag = true;
        setStatus (info.error);
    }
    return info;
}

// Worker thread, inside open(): nothing answered at r.endpoint. As plugin_bridge.client's
// _ensure_daemon: serialise on flock(<lockPath>.start), probe again, start `<command> serve` unless
// an engine is already starting there (ours, still running, or another holding the daemon lock),
// then probe until it answers, it exits, or `until`. True when a probe got `hello`.
bool EngineClient::startEngine (const OpenRequest& r, Clock::time_point until, const std::function<bool (double)>& probe,
                                std::string& why)
{
#if UNBAKE_POSIX
    auto& I = *impl;
    const auto lock = lockPath (r.endpoint);
    const auto startLock = lock + ".start";
    const auto dir = parentOf (lock);
    const auto log = dir + "/engine.log";
    if (access (r.engineCommand.c_str(), X_OK) != 0 || juce::File (juce::String (r.engineCommand)).isDirectory())
    {
        why = "no engine at " + r.endpoint + ", and engine_command " + r.engineCommand
              + " is not an executable file; output is silence";
        return false;
    }
    if (! juce::File (juce::String (dir)).isDirectory() && mkdir (dir.c_str(), 0700) != 0 && errno != EEXIST)
    {
        why = "cannot start the unbake engine at " + r.endpoint + ": " + dir + ": " + std::strerror (errno);
        return false;
    }
    const int fd = ::open (startLock.c_str(), O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
    struct stat st {};
    if (fd < 0 || fstat (fd, &st) != 0 || ! S_ISREG (st.st_mode) || st.st_uid != getuid())
    {
        why = "cannot start the unbake engine at " + r.endpoint + ": its lock " + startLock
              + " is not a file of this user; output is silence";
        if (fd >= 0)
            ::close (fd);
        return false;
    }
    struct Closer { int fd; ~Closer() { ::close (fd); } } closer { fd }; // closing releases the flock
    while (flock (fd, LOCK_EX | LOCK_NB) != 0)
    {
        if (Clock::now() >= until)
        {
            why = "another process is starting the unbake engine at " + r.endpoint + " (lock " + startLock
                  + "); output is silence until it answers";
            return false;
        }
        std::this_thread::sleep_for (std::chrono::milliseconds (50));
    }
    if (probe (kProbeS)) // someone else started it meanwhile
        return true;

    auto daemonLockHeld = [&lock] {
        const int lfd = ::open (lock.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
        if (lfd < 0)
            return false;
        const bool held = flock (lfd, LOCK_SH | LOCK_NB) != 0 && errno == EWOULDBLOCK;
        ::close (lfd);
        return held;
    };
    reapEngine();
    const bool ours = I.spawnedPid > 0 && I.spawnedEndpoint == r.endpoint;
    if (! ours && ! daemonLockHeld())
    {
        std::vector<std::string> args { r.engineCommand, "serve", "--endpoint", r.endpoint, "--idle-exit-s",
                                        std::to_string (kIdleExitS) };
        std::vector<char*> argv;
        for (auto& a : args)
            argv.push_back (a.data());
        argv.push_back (nullptr);
        posix_spawn_file_actions_t fa;
        posix_spawnattr_t attr;
        posix_spawn_file_actions_init (&fa);
        posix_spawn_file_actions_addopen (&fa, 0, "/dev/null", O_RDONLY, 0);
        posix_spawn_file_actions_addopen (&fa, 1, log.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW, 0600);
        posix_spawn_file_actions_adddup2 (&fa, 1, 2);
        posix_spawnattr_init (&attr);
        sigset_t none, defaults;
        sigemptyset (&none);
        sigemptyset (&defaults);
        for (int sig : { SIGPIPE, SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGCHLD, SIGUSR1, SIGUSR2 })
            sigaddset (&defaults, sig);
        posix_spawnattr_setsigmask (&attr, &none);
        posix_spawnattr_setsigdefault (&attr, &defaults);
        short flags = POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF;
       #ifdef POSIX_SPAWN_SETSID
        flags |= POSIX_SPAWN_SETSID; // detached: its own session, no terminal signals of the host's
       #else
        flags |= POSIX_SPAWN_SETPGROUP;
        posix_spawnattr_setpgroup (&attr, 0);
       #endif
        posix_spawnattr_setflags (&attr, flags);
        pid_t pid = 0;
        const int err = posix_spawn (&pid, r.engineCommand.c_str(), &fa, &attr, argv.data(), environ);
        posix_spawn_file_actions_destroy (&fa);
        posix_spawnattr_destroy (&attr);
        if (err != 0)
        {
            why = "cannot start the unbake engine (" + r.engineCommand + " serve): " + std::strerror (err)
                  + " (log " + log + "); output is silence";
            return false;
        }
        I.spawnedPid = pid;
        I.spawnedEndpoint = r.endpoint;
        setStatus ("starting the unbake engine at " + r.endpoint + ": " + r.engineCommand + " serve (pid "
                   + std::to_string ((long) pid) + ", log " + log + ")");
    }
    while (true)
    {
        const auto began = Clock::now();
        if (probe (kProbeS))
            return true;
        if (I.spawnedPid > 0 && I.spawnedEndpoint == r.endpoint)
        {
            int status = 0;
            if (waitpid ((pid_t) I.spawnedPid, &status, WNOHANG) == (pid_t) I.spawnedPid)
            {
                I.spawnedPid = 0;
                if (! daemonLockHeld())
                {
                    why = "the unbake engine (" + r.engineCommand + " serve) exited with status "
                          + std::to_string (WIFEXITED (status) ? WEXITSTATUS (status) : 128 + WTERMSIG (status))
                          + " before answering at " + r.endpoint + " (log " + log + "); output is silence";
                    return false;
                }
            }
        }
        if (Clock::now() >= until)
        {
            why = "the unbake engine started at " + r.endpoint + " has not answered yet (log " + log
                  + "); output is silence until it does";
            return false;
        }
        std::this_thread::sleep_for (std::max (Clock::duration::zero(), std::chrono::milliseconds (100) - (Clock::now() - began)));
    }
#else
    juce::ignoreUnused (r, until, probe);
    why = "no engine at " + r.endpoint + " (starting one is not supported on this platform yet); output is silence";
    return false;
#endif
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
    float* const* outs[1] = { out };
    mixStems (numFrames, 1, gains, outs, numChannels, outStart);
}

void EngineClient::mixStems (int numFrames, int numOutputs, const float* gains, float* const* const* outs,
                             int numChannels, int outStart) noexcept
{
    const int numStems = (int) impl->numStems; // set before the session opened; constant while it runs
    int s1, n1, s2, n2;
    outFifo.prepareToRead (numFrames, s1, n1, s2, n2);
    for (int d = 0; d < numOutputs; ++d)
    {
        if (outs[d] == nullptr)
            continue;
        const float* g = gains + (size_t) d * kMaxStems;
        for (int c = 0; c < numChannels; ++c)
        {
            float* dst = outs[d][c] + outStart;
            std::fill (dst, dst + n1 + n2, 0.0f);
            for (int s = 0; s < numStems; ++s)
            {
                if (g[s] == 0.0f)
                    continue;
                const float* src = outBuf[(size_t) (s * kMaxChannels + c)].data();
                juce::FloatVectorOperations::addWithMultiply (dst, src + s1, g[s], n1);
                if (n2 > 0)
                    juce::FloatVectorOperations::addWithMultiply (dst + n1, src + s2, g[s], n2);
            }
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
