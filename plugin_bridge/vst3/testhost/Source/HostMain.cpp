// unbake_rt_host: plays an input through a VST3 at the audio rate, as a DAW's audio thread would, and
// times every processBlock call.
//
//   unbake_rt_host --plugin unbake.vst3 --input in.f32 --output out.f32 [--rate 44100] [--block 512]
//                  [--channels 2] [--state-b64 B64 | --state-file PATH] [--param NAME=TEXT ...]
//                  [--tail-blocks 16] [--lead-ms 100] [--aux] [--no-fifo] [--no-mlock] [--priority 80]
//                  [--preroll-speed 1] [--realtime-before-s 3]
//
// Input and outputs are raw little-endian float32, interleaved [frames][channels]. The state is what a
// JUCE host's getStateInformation returns (pedalboard's `raw_state`); --param sets a parameter by its
// name from its text ("-6", "true"). The plugin is set to real time (setNonRealtime(false)) and
// prepared; a dedicated thread (SCHED_FIFO when the OS allows it, else silently the default policy)
// sleeps until each block's wall-clock due time (start + b * block / rate) and calls processBlock
// once per block: the input, then silence for the reported latency plus --tail-blocks blocks. The
// main thread is JUCE's message thread and dispatches messages meanwhile. --preroll-speed X (> 1)
// feeds the blocks whose output lies within the reported latency, up to --realtime-before-s seconds
// before the first output frame that is not pre-roll, X times faster than the audio rate: their output
// is the plugin's pre-roll silence whatever the engine does, and a long latency (tens of seconds) then
// costs a test less wall time; every block from there on is due at the audio rate. Then the output is written
// (the main bus to --output; with --aux every output bus after the first to OUTPUT.busN), and one
// JSON line goes to stdout: the timings of the calls (wall clock, steady clock; and the thread's CPU
// time where POSIX has it), the reported latency, and the plugin's late frames read from its state
// (getStateInformation -> the IComponent state -> copyXmlToBinary XML -> <engine_status late_frames>;
// null when the plugin's state has no such node).
//
// On stderr, before the first block: "unbake_rt_host: stream starts at monotonic T s" (T: the steady
// clock, CLOCK_MONOTONIC on Linux, as Python's time.monotonic()): every block b fed at the audio rate is
// due at T + b * block / rate (with a fast pre-roll T is that of a stream fed at the audio rate from
// block 0), so that a test can act at a known stream time.

#include <juce_audio_processors/juce_audio_processors.h>

#include <algorithm>
#include <numeric>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
 #include <pthread.h>
 #include <sched.h>
 #include <sys/mman.h>
 #include <sys/resource.h>
 #include <time.h>
 #define UNBAKE_POSIX 1
#else
 #define UNBAKE_POSIX 0
#endif

namespace
{
using Clock = std::chrono::steady_clock;

struct Options
{
    juce::String plugin, input, output, stateB64, stateFile;
    std::vector<std::pair<juce::String, juce::String>> params;
    double rate = 44100.0;
    int block = 512, channels = 2, tailBlocks = 16, priority = 80;
    double leadMs = 100.0, prerollSpeed = 1.0, realtimeBeforeS = 3.0;
    bool aux = false, fifo = true, mlock = true;
};

[[noreturn]] void fail (const juce::String& why)
{
    std::cerr << "unbake_rt_host: error: " << why << std::endl;
    std::exit (2);
}

Options parse (int argc, char** argv)
{
    Options o;
    for (int i = 1; i < argc; ++i)
    {
        const juce::String a (argv[i]);
        auto value = [&]() -> juce::String {
            if (i + 1 >= argc)
                fail (a + " needs a value");
            return juce::String (argv[++i]);
        };
        auto number = [&] (double lo, double hi) {
            const auto v = value();
            if (! v.containsOnly ("0123456789.-+eE") || v.isEmpty())
                fail (a + ": not a number: " + v);
            const double d = v.getDoubleValue();
            if (! (d >= lo && d <= hi))
                fail (a + ": " + v + " is outside [" + juce::String (lo) + ", " + juce::String (hi) + "]");
            return d;
        };
        if (a == "--plugin") o.plugin = value();
        else if (a == "--input") o.input = value();
        else if (a == "--output") o.output = value();
        else if (a == "--rate") o.rate = number (1000, 768000);
        else if (a == "--block") o.block = (int) number (1, 65536);
        else if (a == "--channels") o.channels = (int) number (1, 64);
        else if (a == "--tail-blocks") o.tailBlocks = (int) number (0, 1 << 20);
        else if (a == "--lead-ms") o.leadMs = number (0, 60000);
        else if (a == "--priority") o.priority = (int) number (1, 99);
        else if (a == "--preroll-speed") o.prerollSpeed = number (1, 1000);
        else if (a == "--realtime-before-s") o.realtimeBeforeS = number (0, 3600);
        else if (a == "--state-b64") o.stateB64 = value();
        else if (a == "--state-file") o.stateFile = value();
        else if (a == "--param")
        {
            const auto p = value();
            if (! p.containsChar ('='))
                fail ("--param wants NAME=TEXT, not " + p);
            o.params.emplace_back (p.upToFirstOccurrenceOf ("=", false, false), p.fromFirstOccurrenceOf ("=", false, false));
        }
        else if (a == "--aux") o.aux = true;
        else if (a == "--no-fifo") o.fifo = false;
        else if (a == "--no-mlock") o.mlock = false;
        else if (a == "--help" || a == "-h")
        {
            std::cout << "usage: unbake_rt_host --plugin X.vst3 --input IN.f32 --output OUT.f32 [--rate R] [--block N]\n"
                         "       [--channels C] [--state-b64 B64 | --state-file PATH] [--param NAME=TEXT ...]\n"
                         "       [--tail-blocks N] [--lead-ms MS] [--aux] [--no-fifo] [--no-mlock] [--priority P]\n"
                         "       [--preroll-speed X] [--realtime-before-s S]\n";
            std::exit (0);
        }
        else
            fail ("unknown argument " + a + " (see --help)");
    }
    if (o.plugin.isEmpty() || o.input.isEmpty() || o.output.isEmpty())
        fail ("--plugin, --input and --output are required (see --help)");
    if (o.stateB64.isNotEmpty() && o.stateFile.isNotEmpty())
        fail ("--state-b64 and --state-file: one of them");
    return o;
}

std::string jsonString (const juce::String& s)
{
    std::string out = "\"";
    for (auto c : s.toStdString())
    {
        switch (c)
        {
            case '"': out += "\\\""; break;
            case '\\': out += "\\\\"; break;
            case '\n': out += "\\n"; break;
            case '\r': out += "\\r"; break;
            case '\t': out += "\\t"; break;
            default:
                if ((unsigned char) c < 0x20)
                {
                    char buf[8];
                    std::snprintf (buf, sizeof buf, "\\u%04x", (unsigned) (unsigned char) c);
                    out += buf;
                }
                else
                    out += c;
        }
    }
    return out + "\"";
}

std::string num (double v, int decimals = 1)
{
    if (! std::isfinite (v))
        return "null";
    char buf[64];
    std::snprintf (buf, sizeof buf, "%.*f", decimals, v);
    return buf;
}

// nearest-rank percentile of an unsorted copy
double percentile (std::vector<double> v, double p)
{
    if (v.empty())
        return std::nan ("");
    std::sort (v.begin(), v.end());
    const auto rank = (size_t) std::ceil (p / 100.0 * (double) v.size());
    return v[std::min (v.size() - 1, rank == 0 ? 0 : rank - 1)];
}

double threadCpuUs()
{
#if UNBAKE_POSIX && defined(CLOCK_THREAD_CPUTIME_ID)
    timespec ts {};
    clock_gettime (CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double) ts.tv_sec * 1e6 + (double) ts.tv_nsec * 1e-3;
#else
    return std::nan ("");
#endif
}

// The calling thread's context switches so far: {voluntary (it waited: a lock, a sleep, I/O),
// involuntary (the OS took the CPU away)}; {-1, -1} where the OS does not count them per thread.
std::pair<long, long> threadSwitches()
{
#if UNBAKE_POSIX && defined(RUSAGE_THREAD)
    rusage ru {};
    if (getrusage (RUSAGE_THREAD, &ru) == 0)
        return { ru.ru_nvcsw, ru.ru_nivcsw };
#endif
    return { -1, -1 };
}

void sleepUntil (Clock::time_point t)
{
#if defined(__linux__)
    // libstdc++'s steady_clock is CLOCK_MONOTONIC: an absolute sleep does not drift
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds> (t.time_since_epoch()).count();
    timespec ts { (time_t) (ns / 1000000000), (long) (ns % 1000000000) };
    while (clock_nanosleep (CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, nullptr) == EINTR) {}
#else
    std::this_thread::sleep_until (t);
#endif
}

// SCHED_FIFO for the calling thread; "" when set, else why not (the thread keeps its policy)
std::string makeRealtime (int priority)
{
#if UNBAKE_POSIX
    sched_param sp {};
    sp.sched_priority = std::clamp (priority, sched_get_priority_min (SCHED_FIFO), sched_get_priority_max (SCHED_FIFO));
    const int rc = pthread_setschedparam (pthread_self(), SCHED_FIFO, &sp);
    return rc == 0 ? std::string() : std::string (std::strerror (rc));
#else
    juce::ignoreUnused (priority);
    return "not POSIX";
#endif
}

// The plugin's own state XML: a JUCE host wraps it (VST3PluginState -> IComponent, base64); a state
// that is already the plugin's is returned as it is.
std::unique_ptr<juce::XmlElement> pluginStateXml (juce::AudioPluginInstance& p)
{
    juce::MemoryBlock mb;
    p.getStateInformation (mb);
    auto outer = juce::AudioProcessor::getXmlFromBinary (mb.getData(), (int) mb.getSize());
    if (outer == nullptr || ! outer->hasTagName ("VST3PluginState"))
        return outer;
    auto* component = outer->getChildByName ("IComponent");
    if (component == nullptr)
        return nullptr;
    juce::MemoryBlock inner;
    if (! inner.fromBase64Encoding (component->getAllSubText()))
        return nullptr;
    return juce::AudioProcessor::getXmlFromBinary (inner.getData(), (int) inner.getSize());
}

juce::AudioProcessorParameter* findParameter (juce::AudioPluginInstance& p, const juce::String& name)
{
    for (auto* param : p.getParameters())
        if (param->getName (1024) == name)
            return param;
    return nullptr;
}

bool writeRaw (const juce::String& path, const std::vector<float>& data)
{
    juce::File f (path);
    f.deleteFile();
    juce::FileOutputStream out (f);
    if (! out.openedOk())
        return false;
    out.write (data.data(), data.size() * sizeof (float));
    out.flush();
    return ! out.getStatus().failed();
}

juce::String busPath (const juce::String& output, int bus)
{
    const juce::File f (output);
    const auto ext = f.getFileExtension();
    return f.getParentDirectory().getChildFile (f.getFileNameWithoutExtension() + ".bus" + juce::String (bus) + ext).getFullPathName();
}
} // namespace

int main (int argc, char** argv)
{
    const auto opt = parse (argc, argv);
    const int C = opt.channels, B = opt.block;

    juce::MemoryBlock inputData;
    if (! juce::File (opt.input).loadFileAsData (inputData))
        fail ("cannot read " + opt.input);
    if (inputData.getSize() % (sizeof (float) * (size_t) C) != 0)
        fail (opt.input + ": " + juce::String ((int64_t) inputData.getSize()) + " bytes is not a whole number of "
              + juce::String (C) + "-channel float32 frames");
    const auto inputFrames = (int64_t) (inputData.getSize() / (sizeof (float) * (size_t) C));
    const auto* input = static_cast<const float*> (inputData.getData());

    bool locked = false;
#if UNBAKE_POSIX
    if (opt.mlock)
        locked = mlockall (MCL_CURRENT | MCL_FUTURE) == 0; // no page faults on the audio thread
#endif

    juce::ScopedJuceInitialiser_GUI juceInit; // this thread is JUCE's message thread
    juce::AudioPluginFormatManager formats;
    formats.addFormat (new juce::VST3PluginFormat());
    juce::OwnedArray<juce::PluginDescription> types;
    formats.getFormat (0)->findAllTypesForFile (types, opt.plugin);
    if (types.isEmpty())
        fail ("no VST3 plugin in " + opt.plugin);
    juce::String error;
    auto plugin = formats.createPluginInstance (*types[0], opt.rate, B, error);
    if (plugin == nullptr)
        fail ("cannot load " + opt.plugin + ": " + error);

    // main bus: C channels in and out; --aux: every other bus enabled with the main layout
    auto layout = plugin->getBusesLayout();
    const auto mainSet = juce::AudioChannelSet::canonicalChannelSet (C);
    if (! layout.inputBuses.isEmpty())
        layout.inputBuses.getReference (0) = mainSet;
    if (layout.outputBuses.isEmpty())
        fail (opt.plugin + " has no output bus");
    layout.outputBuses.getReference (0) = mainSet;
    juce::String auxError;
    if (opt.aux)
    {
        auto withAux = layout;
        for (int i = 1; i < withAux.inputBuses.size(); ++i)
            withAux.inputBuses.getReference (i) = mainSet;
        for (int i = 1; i < withAux.outputBuses.size(); ++i)
            withAux.outputBuses.getReference (i) = mainSet;
        if (withAux.outputBuses.size() < 2)
            auxError = "the plugin has no aux output bus";
        else if (plugin->setBusesLayout (withAux))
            layout = withAux;
        else
            auxError = "the plugin refused its aux buses enabled with the main layout";
    }
    if (plugin->getBusesLayout() != layout && ! plugin->setBusesLayout (layout))
        fail (opt.plugin + " refused " + juce::String (C) + " channels in and out");

    if (opt.stateB64.isNotEmpty() || opt.stateFile.isNotEmpty())
    {
        juce::MemoryBlock state;
        const bool ok = opt.stateB64.isNotEmpty() ? state.fromBase64Encoding (opt.stateB64)
                                                  : juce::File (opt.stateFile).loadFileAsData (state);
        if (! ok || state.isEmpty())
            fail ("cannot read the state (" + (opt.stateB64.isNotEmpty() ? juce::String ("--state-b64") : opt.stateFile) + ")");
        plugin->setStateInformation (state.getData(), (int) state.getSize());
    }
    std::vector<std::pair<juce::String, juce::String>> paramsSet;
    for (const auto& [name, text] : opt.params)
    {
        auto* p = findParameter (*plugin, name);
        if (p == nullptr)
            fail ("no parameter named " + name);
        p->setValueNotifyingHost (p->getValueForText (text));
        paramsSet.emplace_back (name, p->getText (p->getValue(), 64));
    }

    plugin->setNonRealtime (false);
    plugin->prepareToPlay (opt.rate, B);
    juce::MessageManager::getInstance()->runDispatchLoopUntil (50);
    // A JUCE host reads IAudioProcessor::getLatencySamples before setActive, and a plugin may learn its
    // latency only in setActive (prepareToPlay): prepared once more, the host reads the latency
    // the plugin states now (a DAW gets it through restartComponent(kLatencyChanged)).
    const int latencyFirst = plugin->getLatencySamples();
    plugin->releaseResources();
    plugin->prepareToPlay (opt.rate, B);
    const int latency = plugin->getLatencySamples();

    const int64_t totalFrames = inputFrames + latency + (int64_t) opt.tailBlocks * B;
    const int64_t blocks = (totalFrames + B - 1) / B;
    const int64_t frames = blocks * B;

    const int busesOut = plugin->getBusCount (false);
    std::vector<int> busChannels ((size_t) busesOut, 0);
    std::vector<std::vector<float>> out ((size_t) busesOut);
    for (int b = 0; b < busesOut; ++b)
    {
        busChannels[(size_t) b] = plugin->getChannelCountOfBus (false, b);
        if (b == 0 || opt.aux)
            out[(size_t) b].assign ((size_t) (frames * busChannels[(size_t) b]), 0.0f);
    }
    juce::AudioBuffer<float> buffer (std::max (1, std::max (plugin->getTotalNumInputChannels(), plugin->getTotalNumOutputChannels())), B);
    const int inChannels = plugin->getTotalNumInputChannels() > 0 ? plugin->getChannelCountOfBus (true, 0) : 0;
    juce::MidiBuffer midi;
    std::vector<double> procUs ((size_t) blocks), cpuUs ((size_t) blocks), wakeUs ((size_t) blocks);
    std::vector<long> volSw ((size_t) blocks), invSw ((size_t) blocks); // context switches in each call

    std::string schedError = "--no-fifo";
    std::atomic<bool> done { false };
    const auto period = std::chrono::duration<double> ((double) B / opt.rate);
    // blocks fed fast: those whose output is pre-roll, up to realtimeBeforeS before the first stem frame
    const int64_t fastBlocks = opt.prerollSpeed > 1.0
                                   ? std::clamp<int64_t> ((int64_t) std::floor ((latency - opt.realtimeBeforeS * opt.rate) / B), 0, blocks)
                                   : 0;
    const auto start = Clock::now() + std::chrono::microseconds ((int64_t) (opt.leadMs * 1000));
    // block b is due at origin + b * period once b >= fastBlocks
    const auto origin = start - std::chrono::duration_cast<Clock::duration> (period * ((double) fastBlocks * (1.0 - 1.0 / opt.prerollSpeed)));
    auto dueTime = [&] (int64_t b) {
        return b < fastBlocks ? start + std::chrono::duration_cast<Clock::duration> (period * ((double) b / opt.prerollSpeed))
                              : origin + std::chrono::duration_cast<Clock::duration> (period * (double) b);
    };
    {
        const double startS = std::chrono::duration<double> (origin.time_since_epoch()).count();
        char line[160];
        std::snprintf (line, sizeof line, "unbake_rt_host: stream starts at monotonic %.6f s", startS);
        std::cerr << line << std::endl;
    }

    std::thread audio ([&] {
        if (opt.fifo)
            schedError = makeRealtime (opt.priority);
        for (int64_t b = 0; b < blocks; ++b)
        {
            const auto due = dueTime (b);
            sleepUntil (due);
            const auto woke = Clock::now();
            buffer.clear();
            const int64_t pos = b * B;
            const int n = (int) std::clamp<int64_t> (inputFrames - pos, 0, B);
            for (int c = 0; c < std::min (inChannels, C); ++c)
            {
                float* dst = buffer.getWritePointer (plugin->getChannelIndexInProcessBlockBuffer (true, 0, c));
                const float* src = input + pos * C + c;
                for (int k = 0; k < n; ++k)
                    dst[k] = src[(size_t) k * (size_t) C];
            }
            const auto sw0 = threadSwitches();
            const double cpu0 = threadCpuUs();
            const auto t0 = Clock::now();
            {
                // as juce::AudioProcessorPlayer calls a processor
                const juce::ScopedLock sl (plugin->getCallbackLock());
                if (plugin->isSuspended())
                    buffer.clear();
                else
                    plugin->processBlock (buffer, midi);
            }
            const auto t1 = Clock::now();
            cpuUs[(size_t) b] = threadCpuUs() - cpu0;
            const auto sw1 = threadSwitches();
            volSw[(size_t) b] = sw1.first - sw0.first;
            invSw[(size_t) b] = sw1.second - sw0.second;
            procUs[(size_t) b] = std::chrono::duration<double, std::micro> (t1 - t0).count();
            wakeUs[(size_t) b] = std::chrono::duration<double, std::micro> (woke - due).count();
            for (int bus = 0; bus < busesOut; ++bus)
            {
                auto& o = out[(size_t) bus];
                if (o.empty())
                    continue;
                const int bc = busChannels[(size_t) bus];
                for (int c = 0; c < bc; ++c)
                {
                    const float* src = buffer.getReadPointer (plugin->getChannelIndexInProcessBlockBuffer (false, bus, c));
                    float* dst = o.data() + (size_t) pos * (size_t) bc + (size_t) c;
                    for (int k = 0; k < B; ++k)
                        dst[(size_t) k * (size_t) bc] = src[k];
                }
            }
        }
        done = true;
    });
    while (! done)
        juce::MessageManager::getInstance()->runDispatchLoopUntil (20);
    audio.join();
    const double wallS = std::chrono::duration<double> (Clock::now() - start).count();

    // the plugin's status, from its state (message thread)
    std::string lateFrames = "null", status = "null";
    if (auto xml = pluginStateXml (*plugin))
        if (auto* node = xml->getChildByName ("engine_status"))
        {
            status = "{";
            for (int i = 0; i < node->getNumAttributes(); ++i)
                status += (i ? ", " : "") + jsonString (node->getAttributeName (i)) + ": " + jsonString (node->getAttributeValue (i));
            status += "}";
            if (node->hasAttribute ("late_frames"))
                lateFrames = std::to_string (node->getStringAttribute ("late_frames").getLargeIntValue());
        }
    plugin->releaseResources();

    if (! writeRaw (opt.output, out[0]))
        fail ("cannot write " + opt.output);
    std::string auxJson = "[";
    for (int bus = 1; bus < busesOut; ++bus)
        if (! out[(size_t) bus].empty())
        {
            const auto path = busPath (opt.output, bus);
            if (! writeRaw (path, out[(size_t) bus]))
                fail ("cannot write " + path);
            auto* busObj = plugin->getBus (false, bus);
            auxJson += std::string (auxJson.size() > 1 ? ", " : "") + "{\"bus\": " + std::to_string (bus) + ", \"name\": "
                       + jsonString (busObj != nullptr ? busObj->getName() : juce::String()) + ", \"channels\": "
                       + std::to_string (busChannels[(size_t) bus]) + ", \"path\": " + jsonString (path) + "}";
        }
    auxJson += "]";

    // the slowest calls, by block index
    std::vector<int64_t> order ((size_t) blocks);
    for (int64_t i = 0; i < blocks; ++i)
        order[(size_t) i] = i;
    std::partial_sort (order.begin(), order.begin() + std::min<int64_t> (5, blocks), order.end(),
                       [&] (int64_t a, int64_t b) { return procUs[(size_t) a] > procUs[(size_t) b]; });
    std::string slowest = "[";
    for (int64_t i = 0; i < std::min<int64_t> (5, blocks); ++i)
    {
        const auto b = (size_t) order[(size_t) i];
        slowest += std::string (i ? ", " : "") + "{\"block\": " + std::to_string (b) + ", \"us\": " + num (procUs[b])
                   + ", \"cpu_us\": " + num (cpuUs[b]) + ", \"voluntary_switches\": " + std::to_string (volSw[b])
                   + ", \"involuntary_switches\": " + std::to_string (invSw[b]) + "}";
    }
    slowest += "]";

    const int64_t over1ms = std::count_if (procUs.begin(), procUs.end(), [] (double us) { return us > 1000.0; });
    const int64_t cpuOver1ms = std::count_if (cpuUs.begin(), cpuUs.end(), [] (double us) { return us > 1000.0; });
    // a call that waited (a lock, a sleep, I/O) switches voluntarily; one the OS interrupted, involuntarily
    const long voluntary = std::accumulate (volSw.begin(), volSw.end(), 0L);
    const long involuntary = std::accumulate (invSw.begin(), invSw.end(), 0L);
    // a block that began processing more than one period after its due time: the host fell behind
    const int64_t overruns = std::count_if (wakeUs.begin(), wakeUs.end(), [&] (double us) { return us > period.count() * 1e6; });
    std::string params = "{";
    for (size_t i = 0; i < paramsSet.size(); ++i)
        params += (i ? ", " : "") + jsonString (paramsSet[i].first) + ": " + jsonString (paramsSet[i].second);
    params += "}";

    std::ostringstream js;
    js << "{\"plugin\": " << jsonString (opt.plugin) << ", \"rate\": " << num (opt.rate, 0) << ", \"block\": " << B
       << ", \"channels\": " << C << ", \"latency_samples\": " << latency
       << ", \"latency_samples_first_prepare\": " << latencyFirst << ", \"input_frames\": " << inputFrames
       << ", \"blocks\": " << blocks << ", \"frames\": " << frames
       << ", \"process_max_us\": " << num (*std::max_element (procUs.begin(), procUs.end()))
       << ", \"process_p50_us\": " << num (percentile (procUs, 50)) << ", \"process_p99_us\": " << num (percentile (procUs, 99))
       << ", \"process_p999_us\": " << num (percentile (procUs, 99.9))
       << ", \"calls_over_1ms\": " << over1ms << ", \"slowest_calls\": " << slowest
       << ", \"cpu_max_us\": " << num (*std::max_element (cpuUs.begin(), cpuUs.end()))
       << ", \"cpu_p99_us\": " << num (percentile (cpuUs, 99)) << ", \"cpu_calls_over_1ms\": " << cpuOver1ms
       << ", \"voluntary_switches\": " << voluntary << ", \"involuntary_switches\": " << involuntary
       << ", \"wake_late_max_us\": " << num (*std::max_element (wakeUs.begin(), wakeUs.end()))
       << ", \"wake_late_p99_us\": " << num (percentile (wakeUs, 99)) << ", \"overruns\": " << overruns
       << ", \"sched\": " << jsonString (schedError.empty() ? "SCHED_FIFO " + std::to_string (opt.priority)
                                                             : "default (" + schedError + ")")
       << ", \"mlock\": " << (locked ? "true" : "false") << ", \"wall_s\": " << num (wallS, 3)
       << ", \"fast_blocks\": " << fastBlocks << ", \"preroll_speed\": " << num (opt.prerollSpeed, 2)
       << ", \"params\": " << params << ", \"late_frames\": " << lateFrames << ", \"engine_status\": " << status
       << ", \"aux\": " << auxJson << ", \"aux_error\": " << (auxError.isEmpty() ? std::string ("null") : jsonString (auxError))
       << "}";
    std::cout << js.str() << std::endl;
    plugin.reset();
    return 0;
}
