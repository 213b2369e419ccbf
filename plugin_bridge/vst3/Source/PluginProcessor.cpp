#include "PluginProcessor.h"
#include "PluginEditor.h"

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <thread>

namespace unbake
{
namespace
{
double nowMs() { return juce::Time::getMillisecondCounterHiRes(); }
} // namespace

// main input and output, then one aux output per stem (disabled until a host enables it)
juce::AudioProcessor::BusesProperties UnbakeProcessor::busesProperties()
{
    auto buses = BusesProperties()
                     .withInput ("Input", juce::AudioChannelSet::stereo(), true)
                     .withOutput ("Output", juce::AudioChannelSet::stereo(), true);
    for (auto* stem : kStemNames)
        buses = buses.withOutput (stem, juce::AudioChannelSet::stereo(), false);
    return buses;
}

UnbakeProcessor::UnbakeProcessor()
    : AudioProcessor (busesProperties()),
      params (*this, nullptr, "unbake", createParameterLayout())
{
    modelParam = params.getRawParameterValue (kModelId);
    for (int s = 0; s < (int) kStemNames.size(); ++s)
    {
        gainParam[(size_t) s] = params.getRawParameterValue (gainId (s));
        muteParam[(size_t) s] = params.getRawParameterValue (muteId (s));
    }
    params.addParameterListener (kModelId, this);
    sessionThread = std::thread ([this] { sessionLoop(); });
}

UnbakeProcessor::~UnbakeProcessor()
{
    params.removeParameterListener (kModelId, this);
    quitSessionThread = true;
    if (sessionThread.joinable())
        sessionThread.join();
}

// The model parameter changed (automation, the editor, a host's setter; any thread, the audio
// thread included: only atomics here): the session is reopened off the audio thread, by the
// sessionLoop (real time), the next prepare or layout check, or the next offline block; the new
// latency reaches the host through setLatencySamples (JUCE's VST3 wrapper: restartComponent).
void UnbakeProcessor::parameterChanged (const juce::String& parameterID, float newValue)
{
    if (parameterID == kModelId && juce::jlimit (0, modelChoices().size() - 1, (int) newValue) != openModel.load())
        needsNewSession = true;
}

// While the host has the plugin active (prepared), in the background: a new session after reset()
// or a change of model or endpoint in real time (the audio thread never waits for one), and, in
// real time, a new try every kRetryS while there is no engine or the last one went away (it
// reconnects when the engine is back; offline the next render's reset() does). In real time,
// processing is suspended (the host's wrapper outputs silence) while the session changes; offline
// the host's next block waits for it.
//
// Quiet when the host lets go: a VST3 host deactivates a plugin with setProcessing(false) (JUCE's
// wrapper calls reset()) then setActive(false) (releaseResources), also when it deletes it, at the
// end of a process. So a reset's new session waits kResetGraceMs (the host's setActive(false) comes
// first: nothing opens), and this thread never reads the environment: it goes to the state's
// endpoint or to the one the host's last prepare resolved. (Before, a plugin left alive until the
// interpreter exited, after pytest's monkeypatch had restored $UNBAKE_ENDPOINT, opened a session at
// the user's default endpoint from here and logged "no engine at ...".)
void UnbakeProcessor::sessionLoop()
{
    while (! quitSessionThread)
    {
        std::this_thread::sleep_for (std::chrono::milliseconds (20));
        // offline, a failed session is not retried here: a reconnect between two blocks would go on
        // mid-render from a fresh stream (shifted by the latency); the next render's reset() reopens it
        auto wanted = [this] {
            const double now = nowMs();
            const bool retry = ! isNonRealtime() && (! sessionOk || engine.failed()) && now - lastFailMs >= kRetryS * 1000.0;
            return active && sessionRate > 0 && ((needsNewSession && now >= reopenNotBeforeMs.load()) || retry);
        };
        {
            const std::lock_guard<std::mutex> lk (sessionMutex);
            if (! wanted())
                continue;
        }
        // never hold sessionMutex while taking the callback lock (an offline block holds the callback
        // lock and may take sessionMutex). Offline, the host's next block waits for the open (it may
        // wait; suspended, JUCE's wrapper would render it as silence); in real time it is suspended.
        if (isNonRealtime())
        {
            const juce::ScopedLock callback (getCallbackLock());
            const std::lock_guard<std::mutex> lk (sessionMutex);
            if (wanted())
                openSession (sessionRate, sessionChannels, false);
            continue;
        }
        suspendProcessing (true);
        {
            const std::lock_guard<std::mutex> lk (sessionMutex);
            if (wanted())
                openSession (sessionRate, sessionChannels, false);
        }
        suspendProcessing (false);
    }
}

bool UnbakeProcessor::isBusesLayoutSupported (const BusesLayout& layouts) const
{
    const auto in = layouts.getMainInputChannelSet(), out = layouts.getMainOutputChannelSet();
    bool ok = layouts.inputBuses.size() == 1 && in == out
              && (in == juce::AudioChannelSet::mono() || in == juce::AudioChannelSet::stereo());
    // the stems' aux outputs: off, or as many channels as the main output
    for (int b = 1; b < layouts.outputBuses.size(); ++b)
        ok = ok && (layouts.outputBuses[b].isDisabled() || layouts.outputBuses[b] == out);
    // The latency at a new rate or for a new model, before the host reads it. A JUCE VST3 host
    // (pedalboard) prepares a plugin as: setupProcessing (the plugin learns the new rate:
    // getSampleRate()), setBusArrangements (JUCE's wrapper asks this function), the host reads
    // getLatencySamples, setActive (our prepareToPlay). A latency set in prepareToPlay reaches such a
    // host only through an asynchronous restartComponent, after its first render at that rate. So
    // when the rate, the model or the endpoint has changed since the session was opened (or a reset
    // asks for a new one), the session is reopened here, while the plugin is inactive (between
    // releaseResources and prepareToPlay: no processBlock runs), with the same channels;
    // prepareToPlay reopens again only if the channels differ (same latency).
    const double rate = getSampleRate();
    if (ok && ! active.load() && rate > 0)
    {
        auto* self = const_cast<UnbakeProcessor*> (this);
        const std::lock_guard<std::mutex> lk (self->sessionMutex);
        if (sessionRate > 0 && self->sessionStale (rate))
            self->openSession (rate, sessionChannels, true);
    }
    return ok;
}

bool UnbakeProcessor::sessionStale (double rate) const
{
    const int model = juce::jlimit (0, modelChoices().size() - 1, (int) modelParam->load());
    return needsNewSession || rate != sessionRate || model != sessionModel || endpoint() != sessionEndpoint;
}

std::string UnbakeProcessor::endpoint() const
{
    const std::lock_guard<std::mutex> lk (settingsMutex);
    return endpointValue.isNotEmpty() ? endpointValue.toStdString() : defaultEndpoint();
}

std::string UnbakeProcessor::engineCommand() const
{
    {
        const std::lock_guard<std::mutex> lk (settingsMutex);
        if (engineCommandValue.isNotEmpty())
            return engineCommandValue.toStdString();
    }
    const char* e = std::getenv (kEngineCommandEnv);
    return e != nullptr ? std::string (e) : std::string();
}

juce::String UnbakeProcessor::endpointSetting() const
{
    const std::lock_guard<std::mutex> lk (settingsMutex);
    return endpointValue;
}

juce::String UnbakeProcessor::engineCommandSetting() const
{
    const std::lock_guard<std::mutex> lk (settingsMutex);
    return engineCommandValue;
}

void UnbakeProcessor::setEndpoint (const juce::String& e)
{
    params.state.setProperty (kEndpointProperty, e.trim(), nullptr);
    takeSettings (params.state);
}

void UnbakeProcessor::setEngineCommand (const juce::String& path)
{
    params.state.setProperty (kEngineCommandProperty, path.trim(), nullptr);
    takeSettings (params.state);
}

// the settings of a state tree (message thread). A new endpoint asks for a new session; a new
// command is used by the next open (the retries every kRetryS while there is no engine)
void UnbakeProcessor::takeSettings (const juce::ValueTree& state)
{
    const auto e = state.getProperty (kEndpointProperty).toString().trim();
    const auto c = state.getProperty (kEngineCommandProperty).toString().trim();
    bool changed;
    {
        const std::lock_guard<std::mutex> lk (settingsMutex);
        changed = e != endpointValue;
        endpointValue = e;
        engineCommandValue = c;
    }
    const auto& margin = state.getProperty (kRealtimeMarginProperty);
    const double ms = margin.isVoid() ? kRealtimeMarginS * 1000.0 : (double) margin;
    realtimeMarginS = std::isfinite (ms) ? juce::jlimit (0.0, kMaxRealtimeMarginS, ms / 1000.0) : kRealtimeMarginS;
    if (changed)
        needsNewSession = true;
}

void UnbakeProcessor::openSession (double sampleRate, int channels, bool byHost)
{
    // after a failed open, do not try the same again within kRetryS (a host prepares a plugin
    // several times in a row: each would wait for an engine that is not there)
    const double now = nowMs();
    const int model = juce::jlimit (0, modelChoices().size() - 1, (int) modelParam->load());
    // the host's calls resolve the environment ($UNBAKE_ENDPOINT, $UNBAKE_EXECUTABLE); the
    // background thread keeps what they resolved (see sessionLoop)
    if (byHost || hostEndpoint.empty())
    {
        hostEndpoint = defaultEndpoint();
        const char* e = std::getenv (kEngineCommandEnv);
        hostCommand = e != nullptr ? e : "";
    }
    std::string ep, command;
    {
        const std::lock_guard<std::mutex> lk (settingsMutex);
        ep = endpointValue.isNotEmpty() ? endpointValue.toStdString() : hostEndpoint;
        command = engineCommandValue.isNotEmpty() ? engineCommandValue.toStdString() : hostCommand;
    }
    // (the host's opens are spaced by the host's own: a background retry that failed just before
    // an engine came back does not make the host's next prepare skip it)
    const double last = byHost ? lastHostOpenMs : lastFailMs;
    if (! sessionOk && last > 0 && now - last < kRetryS * 1000.0 && sampleRate == sessionRate
        && channels == sessionChannels && model == sessionModel && ep == sessionEndpoint && command == sessionCommand)
    {
        needsNewSession = false;
        return;
    }
    EngineClient::OpenRequest request;
    request.endpoint = ep;
    request.model = modelChoices()[model].toStdString();
    request.sampleRate = (int) std::lround (sampleRate);
    request.channels = channels;
    for (const auto& option : kSessionOptions)
        request.options.emplace_back (option.name, option.value);
    request.timeoutMs = kOpenTimeoutMs;
    request.engineCommand = command;
    // offline (a render waits for its stems anyway) an engine being started is waited for; in real
    // time only briefly (the next tries find it)
    request.startWaitMs = isNonRealtime() ? kOpenTimeoutMs : kRealtimeStartWaitMs;
    const auto info = engine.open (request);
    {
        const std::lock_guard<std::mutex> lk (infoMutex);
        lastInfo = info;
        lastEndpoint = ep;
    }
    sessionRate = sampleRate;
    sessionChannels = channels;
    sessionModel = model;
    openModel = model;
    sessionEndpoint = ep;
    sessionCommand = command;
    framesPushed = 0;
    preRollLeft = 0;
    debt = 0;
    sessionOk = info.ok;
    lastFailMs = nowMs(); // also the time of the last good open: a failure right after waits kRetryS
    if (byHost)
        lastHostOpenMs = lastFailMs;
    numStems = info.ok ? (int) info.stems.size() : 0;
    hasAccompanimentStem = false;
    for (int s = 0; s < numStems; ++s)
    {
        stemParamIndex[(size_t) s] = stemIndex (info.stems[(size_t) s]);
        hasAccompanimentStem |= stemParamIndex[(size_t) s] == kAccompaniment;
    }
    // own buffering: none offline (the block waits for its stems); in real time the compute margin
    // (kRealtimeMarginS), at least one block, so that the engine's reply has time to come back
    const int own = isNonRealtime() ? 0 : std::max (getBlockSize(), (int) std::lround (realtimeMarginS.load() * sampleRate));
    const int latency = info.ok ? info.latencySamples + own : 0;
    preRollLeft = latency;
    sessionLatency = latency;
    setLatencySamples (latency);
    // last: the audio thread reads the session's fields after this flag. A model that changed
    // while this one opened asks for another session.
    needsNewSession = juce::jlimit (0, modelChoices().size() - 1, (int) modelParam->load()) != model;
}

void UnbakeProcessor::releaseResources()
{
    active = false; // the stream goes on (see prepareToPlay)
}

void UnbakeProcessor::prepareToPlay (double sampleRate, int)
{
    active = true;
    // pedalboard calls prepareToPlay again mid-stream when the block size changes: the stream goes on
    // unless the rate, the channels, the model or the endpoint changed (or the last session failed)
    const int channels = getMainBusNumInputChannels();
    const std::lock_guard<std::mutex> lk (sessionMutex);
    if (! sessionOk || engine.failed() || channels != sessionChannels || sessionStale (sampleRate))
        openSession (sampleRate, channels, true);
}

void UnbakeProcessor::reset()
{
    // a new stream: a new session (unless this one has not had a frame yet), opened by the next
    // prepareToPlay or layout check, by the next offline block, or in the background after
    // kResetGraceMs while the host keeps the plugin active; a host may call reset() from the audio
    // thread, so nothing here waits for the engine. Offline, a session that failed (the engine went
    // away, or was not there) is tried again here, as the render starts (see sessionLoop)
    if (framesPushed > 0 || (isNonRealtime() && (! sessionOk || engine.failed())))
    {
        reopenNotBeforeMs = nowMs() + kResetGraceMs;
        needsNewSession = true;
    }
    else if (sessionOk) // nothing sent yet: the same session, its stream from the start again
    {
        preRollLeft = sessionLatency;
        debt = 0;
    }
}

void UnbakeProcessor::computeGains (float* gains) const noexcept
{
    auto linear = [this] (int p) {
        return muteParam[(size_t) p]->load() >= 0.5f ? 0.0f
                                                     : juce::Decibels::decibelsToGain (gainParam[(size_t) p]->load(), -1000.0f);
    };
    const float accompaniment = linear (kAccompaniment);
    for (int s = 0; s < numStems; ++s)
    {
        const int p = stemParamIndex[(size_t) s];
        if (p == kAccompaniment)
            gains[s] = accompaniment;
        else if (p == 0) // vocals
            gains[s] = linear (0);
        else // a stem of "everything but vocals"
            gains[s] = (p >= 0 ? linear (p) : 1.0f) * (hasAccompanimentStem ? 1.0f : accompaniment);
    }
}

void UnbakeProcessor::processBlock (juce::AudioBuffer<float>& buffer, juce::MidiBuffer&)
{
    juce::ScopedNoDenormals noDenormals;
    for (int c = getTotalNumInputChannels(); c < buffer.getNumChannels(); ++c) // the aux outputs
        buffer.clear (c, 0, buffer.getNumSamples());
    if (needsNewSession && isNonRealtime() && sessionRate > 0)
    {
        const std::lock_guard<std::mutex> lk (sessionMutex); // offline: waiting (bounded) is allowed
        if (needsNewSession)
            openSession (sessionRate, sessionChannels, true);
    }
    if (needsNewSession || ! sessionOk || engine.failed() || getMainBusNumInputChannels() != sessionChannels
        || buffer.getNumChannels() < sessionChannels)
    {
        buffer.clear();
        return;
    }
    if (isNonRealtime())
        renderOffline (buffer);
    else
        renderRealtime (buffer);
}

void UnbakeProcessor::clearOutputs (juce::AudioBuffer<float>& buffer, int start, int n) noexcept
{
    // the main output (the aux outputs were cleared when the block began)
    for (int c = 0; c < sessionChannels; ++c)
        juce::FloatVectorOperations::clear (buffer.getWritePointer (c, start), n);
}

// stem frames for output frames [start, start + n): silence for the pre-roll, then the mix (main
// output) and each stem as it sounds in the mix (the aux outputs that are on)
void UnbakeProcessor::outputStems (juce::AudioBuffer<float>& buffer, int start, int n, const float* gains, bool wait,
                                   double deadlineMs)
{
    const int z = (int) std::min<int64_t> (preRollLeft, n);
    clearOutputs (buffer, start, z);
    preRollLeft -= z;
    int pos = start + z, need = n - z;

    if (debt > 0) // frames that came too late for their block
    {
        const int d = (int) std::min<int64_t> (debt, engine.availableStems());
        engine.discardStems (d);
        debt -= d;
    }
    if (wait && engine.availableStems() < need && ! engine.failed())
        engine.waitForStems (need, deadlineMs - nowMs()); // offline: blocks, woken by the worker
    const int have = debt > 0 ? 0 : std::min (need, engine.availableStems());
    if (have > 0)
    {
        constexpr int kOutputs = 1 + kNumStemBuses;
        constexpr int M = EngineClient::kMaxStems;
        std::array<float, (size_t) (kOutputs * M)> routes {};
        std::array<std::array<float*, EngineClient::kMaxChannels>, (size_t) kOutputs> channels {};
        std::array<float* const*, (size_t) kOutputs> outs {};
        for (int s = 0; s < numStems; ++s)
        {
            routes[(size_t) s] = gains[s]; // the main output: the mix
            const int p = stemParamIndex[(size_t) s];
            // bus of stem p: that stem; the accompaniment's: every stem but vocals (each as in the mix)
            if (p >= 0 && p != kAccompaniment)
                routes[(size_t) ((1 + p) * M + s)] = gains[s];
            if (p != 0)
                routes[(size_t) ((1 + kAccompaniment) * M + s)] = gains[s];
        }
        for (int c = 0; c < sessionChannels; ++c)
            channels[0][(size_t) c] = buffer.getWritePointer (c);
        outs[0] = channels[0].data();
        const int numBuses = std::min (getBusCount (false), kOutputs);
        for (int b = 1; b < numBuses; ++b)
        {
            const auto* bus = getBus (false, b);
            if (bus == nullptr || ! bus->isEnabled() || bus->getNumberOfChannels() < sessionChannels)
                continue;
            const int first = bus->getChannelIndexInProcessBlockBuffer (0);
            if (first < 0 || first + sessionChannels > buffer.getNumChannels())
                continue;
            for (int c = 0; c < sessionChannels; ++c)
                channels[(size_t) b][(size_t) c] = buffer.getWritePointer (first + c);
            outs[(size_t) b] = channels[(size_t) b].data();
        }
        engine.mixStems (have, kOutputs, routes.data(), outs.data(), sessionChannels, pos);
    }
    pos += have;
    need -= have;
    if (need > 0)
    {
        clearOutputs (buffer, pos, need);
        late += need;
        debt += need;
    }
}

// A stream starts at its first non-silent frame: the digital silence a host plays before it
// (a DAW's pre-roll, the transport started before a region, an export's run-up) is not sent, and
// comes out as silence, one more frame of pre-roll each. So the engine's segment grid starts with
// the audio and a render does not depend on where the host started playing: a region exported
// from a DAW equals Client.separate of the region. Returns the frames of [start, start + n) skipped.
int UnbakeProcessor::skipSilence (const juce::AudioBuffer<float>& buffer, int start, int n) noexcept
{
    if (framesPushed > 0)
        return 0;
    int k = 0;
    for (; k < n; ++k)
    {
        bool silent = true;
        for (int c = 0; c < sessionChannels && silent; ++c)
            silent = buffer.getSample (c, start + k) == 0.0f;
        if (! silent)
            break;
    }
    preRollLeft += k;
    return k;
}

void UnbakeProcessor::renderOffline (juce::AudioBuffer<float>& buffer)
{
    std::array<float, EngineClient::kMaxStems> gains {};
    computeGains (gains.data());
    const int n = buffer.getNumSamples();
    const double deadline = nowMs() + kOfflineWaitS * 1000.0;
    for (int start = 0; start < n;)
    {
        const int piece = std::min (n - start, EngineClient::kFifoFrames / 4);
        const int skipped = skipSilence (buffer, start, piece);
        for (int written = skipped; written < piece;)
        {
            written += engine.writeInput (buffer.getArrayOfReadPointers(), sessionChannels, start + written, piece - written);
            if (written < piece)
            {
                if (engine.failed() || nowMs() > deadline)
                {
                    buffer.clear();
                    late += n - start;
                    return;
                }
                std::this_thread::sleep_for (std::chrono::microseconds (100));
            }
        }
        framesPushed += piece - skipped;
        outputStems (buffer, start, piece, gains.data(), true, deadline);
        start += piece;
    }
}

void UnbakeProcessor::renderRealtime (juce::AudioBuffer<float>& buffer)
{
    // never blocks, locks or allocates: FIFOs only
    std::array<float, EngineClient::kMaxStems> gains {};
    computeGains (gains.data());
    const int n = buffer.getNumSamples();
    const int skipped = skipSilence (buffer, 0, n);
    const int written = engine.writeInput (buffer.getArrayOfReadPointers(), sessionChannels, skipped, n - skipped);
    framesPushed += written;
    if (written < n - skipped)
        late += n - skipped - written; // input the engine will never see (FIFO full): counted
    outputStems (buffer, 0, n, gains.data(), false, 0.0);
}

juce::AudioProcessorEditor* UnbakeProcessor::createEditor()
{
    return createUnbakeEditor (*this);
}

EngineStatus UnbakeProcessor::engineStatus() const
{
    EngineStatus st;
    st.line = engine.status();
    st.lateFrames = late.load();
    st.latencySamples = getLatencySamples();
    st.sampleRate = getSampleRate();
    {
        const std::lock_guard<std::mutex> lk (infoMutex);
        st.endpoint = lastEndpoint;
        st.model = lastInfo.model;
        st.device = lastInfo.device;
        if (lastInfo.ok)
            st.stems = lastInfo.stems;
        st.connected = lastInfo.ok && engine.hasSession() && ! engine.failed();
    }
    if (st.endpoint.empty()) // no session opened yet: where the next one goes
        st.endpoint = endpoint();
    if (st.model.empty()) // no session opened yet: the model asked for
        st.model = modelChoices()[juce::jlimit (0, modelChoices().size() - 1, (int) modelParam->load())].toStdString();
    return st;
}

void UnbakeProcessor::getStateInformation (juce::MemoryBlock& destData)
{
    auto state = params.copyState();
    state.setProperty (kEndpointProperty, endpointSetting(), nullptr);
    state.setProperty (kEngineCommandProperty, engineCommandSetting(), nullptr);
    state.setProperty (kRealtimeMarginProperty, realtimeMarginS.load() * 1000.0, nullptr);
    auto xml = state.createXml();
    if (xml == nullptr)
        return;
    xml->deleteAllChildElementsWithTagName (kStatusNode);
    const auto st = engineStatus();
    juce::StringArray stems;
    for (const auto& s : st.stems)
        stems.add (s);
    auto* node = xml->createNewChildElement (kStatusNode); // read-only: setStateInformation ignores it
    node->setAttribute ("connected", st.connected ? "1" : "0");
    node->setAttribute ("endpoint", juce::String (st.endpoint));
    node->setAttribute ("model", juce::String (st.model));
    node->setAttribute ("device", juce::String (st.device));
    node->setAttribute ("line", juce::String (st.line));
    node->setAttribute ("latency_samples", st.latencySamples);
    node->setAttribute ("sample_rate", juce::String ((juce::int64) std::llround (st.sampleRate)));
    node->setAttribute ("late_frames", juce::String ((juce::int64) st.lateFrames));
    node->setAttribute ("stems", stems.joinIntoString (","));
    copyXmlToBinary (*xml, destData);
}

void UnbakeProcessor::setStateInformation (const void* data, int sizeInBytes)
{
    auto xml = getXmlFromBinary (data, sizeInBytes);
    if (xml == nullptr || ! xml->hasTagName (params.state.getType()))
        return;
    xml->deleteAllChildElementsWithTagName (kStatusNode);
    params.replaceState (juce::ValueTree::fromXml (*xml));
    takeSettings (params.state);
}
} // namespace unbake

juce::AudioProcessor* JUCE_CALLTYPE createPluginFilter()
{
    return new unbake::UnbakeProcessor();
}
