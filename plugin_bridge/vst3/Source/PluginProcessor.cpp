#include "PluginProcessor.h"
#include "PluginEditor.h"

#include <chrono>
#include <thread>

namespace unbake
{
namespace
{
double nowMs() { return juce::Time::getMillisecondCounterHiRes(); }
} // namespace

UnbakeProcessor::UnbakeProcessor()
    : AudioProcessor (BusesProperties()
                          .withInput ("Input", juce::AudioChannelSet::stereo(), true)
                          .withOutput ("Output", juce::AudioChannelSet::stereo(), true)),
      params (*this, nullptr, "unbake", createParameterLayout())
{
    modelParam = params.getRawParameterValue (kModelId);
    for (int s = 0; s < (int) kStemNames.size(); ++s)
    {
        gainParam[(size_t) s] = params.getRawParameterValue (gainId (s));
        muteParam[(size_t) s] = params.getRawParameterValue (muteId (s));
    }
    sessionThread = std::thread ([this] { sessionLoop(); });
}

UnbakeProcessor::~UnbakeProcessor()
{
    quitSessionThread = true;
    if (sessionThread.joinable())
        sessionThread.join();
}

// A new session after reset() in real time (the audio thread never waits for one), and a new try
// every kRetryS while there is no engine or the last one went away (it reconnects when the engine
// is back). Processing is suspended (the host's wrapper outputs silence) while the session changes.
void UnbakeProcessor::sessionLoop()
{
    while (! quitSessionThread)
    {
        std::this_thread::sleep_for (std::chrono::milliseconds (20));
        auto wanted = [this] {
            // retries go to the endpoint that failed (the environment may have changed since:
            // a new endpoint is taken at the next prepare, not by this thread)
            const bool retry = active && (! sessionOk || engine.failed()) && nowMs() - lastFailMs >= kRetryS * 1000.0
                               && endpoint() == sessionEndpoint;
            return sessionRate > 0 && (needsNewSession || retry);
        };
        {
            const std::lock_guard<std::mutex> lk (sessionMutex);
            if (! wanted())
                continue;
        }
        // never hold sessionMutex while taking the callback lock (an offline block holds the callback
        // lock and may take sessionMutex)
        suspendProcessing (true);
        {
            const std::lock_guard<std::mutex> lk (sessionMutex);
            if (wanted())
                openSession (sessionRate, sessionChannels);
        }
        suspendProcessing (false);
    }
}

bool UnbakeProcessor::isBusesLayoutSupported (const BusesLayout& layouts) const
{
    const auto in = layouts.getMainInputChannelSet(), out = layouts.getMainOutputChannelSet();
    const bool ok = in == out && (in == juce::AudioChannelSet::mono() || in == juce::AudioChannelSet::stereo());
    // The latency at a new rate, before the host reads it. A JUCE VST3 host (pedalboard) prepares a
    // plugin as: setupProcessing (the plugin learns the new rate: getSampleRate()), setBusArrangements
    // (JUCE's wrapper asks this function), the host reads getLatencySamples, setActive (our
    // prepareToPlay). A latency set in prepareToPlay reaches such a host only through an asynchronous
    // restartComponent, after its first render at that rate. So when the rate has changed since the
    // session was opened, the session is reopened here, while the plugin is inactive (between
    // releaseResources and prepareToPlay: no processBlock runs), with the same channels;
    // prepareToPlay reopens again only if the channels or the model differ (same latency).
    const double rate = getSampleRate();
    if (ok && ! active.load() && rate > 0 && sessionRate > 0 && rate != sessionRate)
    {
        auto* self = const_cast<UnbakeProcessor*> (this);
        const std::lock_guard<std::mutex> lk (self->sessionMutex);
        self->openSession (rate, sessionChannels);
    }
    return ok;
}

std::string UnbakeProcessor::endpoint() const
{
    const auto e = params.state.getProperty (kEndpointProperty).toString();
    return e.isNotEmpty() ? e.toStdString() : defaultEndpoint();
}

void UnbakeProcessor::openSession (double sampleRate, int channels)
{
    // after a failed open, do not try the same again within kRetryS (a host prepares a plugin
    // several times in a row: each would wait for an engine that is not there)
    const double now = nowMs();
    const int model = juce::jlimit (0, modelChoices().size() - 1, (int) modelParam->load());
    const auto ep = endpoint();
    if (! sessionOk && lastFailMs > 0 && now - lastFailMs < kRetryS * 1000.0 && sampleRate == sessionRate
        && channels == sessionChannels && model == sessionModel && ep == sessionEndpoint)
        return;
    const auto info = engine.open (ep, modelChoices()[model].toStdString(), (int) std::lround (sampleRate), channels,
                                   kOpenTimeoutMs);
    sessionRate = sampleRate;
    sessionChannels = channels;
    sessionModel = model;
    sessionEndpoint = ep;
    framesPushed = 0;
    preRollLeft = 0;
    debt = 0;
    sessionOk = info.ok;
    lastFailMs = nowMs(); // also the time of the last good open: a failure right after waits kRetryS
    numStems = info.ok ? (int) info.stems.size() : 0;
    hasAccompanimentStem = false;
    for (int s = 0; s < numStems; ++s)
    {
        stemParamIndex[(size_t) s] = stemIndex (info.stems[(size_t) s]);
        hasAccompanimentStem |= stemParamIndex[(size_t) s] == kAccompaniment;
    }
    // own buffering: none offline (the block waits for its stems); in real time one block more,
    // so that the engine's reply has a block's time to come back
    const int own = isNonRealtime() ? 0 : getBlockSize();
    const int latency = info.ok ? info.latencySamples + own : 0;
    preRollLeft = latency;
    setLatencySamples (latency);
    {
        const std::lock_guard<std::mutex> lk (infoMutex); // P2 stub
        lastInfo = info;
    }
    needsNewSession = false; // last: the audio thread reads the session's fields after this flag
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
    const int channels = getTotalNumInputChannels();
    const int model = juce::jlimit (0, modelChoices().size() - 1, (int) modelParam->load());
    if (needsNewSession || ! sessionOk || engine.failed() || sampleRate != sessionRate || channels != sessionChannels
        || model != sessionModel || endpoint() != sessionEndpoint)
    {
        const std::lock_guard<std::mutex> lk (sessionMutex);
        openSession (sampleRate, channels);
    }
}

void UnbakeProcessor::reset()
{
    // a new stream: a new session (unless this one has not had a frame yet), opened by the next
    // prepareToPlay, or by the next offline block; a host may call reset() from the audio thread,
    // so nothing here waits for the engine
    if (framesPushed > 0)
        needsNewSession = true;
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
    for (int c = getTotalNumInputChannels(); c < getTotalNumOutputChannels(); ++c)
        buffer.clear (c, 0, buffer.getNumSamples());
    if (needsNewSession && isNonRealtime() && sessionRate > 0)
    {
        const std::lock_guard<std::mutex> lk (sessionMutex); // offline: waiting (bounded) is allowed
        if (needsNewSession)
            openSession (sessionRate, sessionChannels);
    }
    if (needsNewSession || ! sessionOk || engine.failed() || buffer.getNumChannels() < sessionChannels)
    {
        buffer.clear();
        return;
    }
    if (isNonRealtime())
        renderOffline (buffer);
    else
        renderRealtime (buffer);
}

// stem frames for output frames [start, start + n): silence for the pre-roll, then the mix
void UnbakeProcessor::outputStems (juce::AudioBuffer<float>& buffer, int start, int n, const float* gains, bool wait,
                                   double deadlineMs)
{
    const int z = (int) std::min<int64_t> (preRollLeft, n);
    for (int c = 0; c < sessionChannels; ++c)
        juce::FloatVectorOperations::clear (buffer.getWritePointer (c, start), z);
    preRollLeft -= z;
    int pos = start + z, need = n - z;

    if (debt > 0) // frames that came too late for their block
    {
        const int d = (int) std::min<int64_t> (debt, engine.availableStems());
        engine.discardStems (d);
        debt -= d;
    }
    if (wait)
        while (engine.availableStems() < need && ! engine.failed() && nowMs() < deadlineMs)
            std::this_thread::sleep_for (std::chrono::microseconds (100));
    const int have = debt > 0 ? 0 : std::min (need, engine.availableStems());
    if (have > 0)
        engine.mixStems (have, gains, buffer.getArrayOfWritePointers(), sessionChannels, pos);
    pos += have;
    need -= have;
    if (need > 0)
    {
        for (int c = 0; c < sessionChannels; ++c)
            juce::FloatVectorOperations::clear (buffer.getWritePointer (c, pos), need);
        late += need;
        debt += need;
    }
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
        for (int written = 0; written < piece;)
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
        framesPushed += piece;
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
    const int written = engine.writeInput (buffer.getArrayOfReadPointers(), sessionChannels, 0, n);
    framesPushed += written;
    if (written < n)
        late += n - written; // input the engine will never see (FIFO full): counted
    outputStems (buffer, 0, n, gains.data(), false, 0.0);
}

juce::AudioProcessorEditor* UnbakeProcessor::createEditor()
{
    return createUnbakeEditor (*this);
}

EngineStatus UnbakeProcessor::engineStatus() const
{
    EngineStatus st;
    st.endpoint = endpoint();
    st.line = engine.status();
    st.lateFrames = late.load();
    st.latencySamples = getLatencySamples();
    st.sampleRate = getSampleRate();
    {
        const std::lock_guard<std::mutex> lk (infoMutex); // P2 stub: connected, model, device, stems
        st.connected = lastInfo.ok && engine.hasSession() && ! engine.failed();
        st.model = lastInfo.model;
        st.device = lastInfo.device;
        st.stems = lastInfo.stems;
    }
    return st;
}

// P2 stub: the settings are properties of the state (saved with it)
void UnbakeProcessor::setEndpoint (const juce::String& e) { params.state.setProperty (kEndpointProperty, e, nullptr); }
juce::String UnbakeProcessor::endpointSetting() const { return params.state.getProperty (kEndpointProperty).toString(); }
void UnbakeProcessor::setEngineCommand (const juce::String& c) { params.state.setProperty ("engine_command", c, nullptr); }
juce::String UnbakeProcessor::engineCommandSetting() const { return params.state.getProperty ("engine_command").toString(); }

void UnbakeProcessor::getStateInformation (juce::MemoryBlock& destData)
{
    if (auto xml = params.copyState().createXml())
        copyXmlToBinary (*xml, destData);
}

void UnbakeProcessor::setStateInformation (const void* data, int sizeInBytes)
{
    if (auto xml = getXmlFromBinary (data, sizeInBytes))
        if (xml->hasTagName (params.state.getType()))
            params.replaceState (juce::ValueTree::fromXml (*xml));
}
} // namespace unbake

juce::AudioProcessor* JUCE_CALLTYPE createPluginFilter()
{
    return new unbake::UnbakeProcessor();
}
