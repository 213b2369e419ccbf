#pragma once

#include "EngineClient.h"
#include "Parameters.h"
#include "Status.h"

#include <juce_audio_processors/juce_audio_processors.h>

#include <array>
#include <atomic>
#include <mutex>
#include <thread>

namespace unbake
{
class UnbakeProcessor final : public juce::AudioProcessor, private juce::AudioProcessorValueTreeState::Listener
{
public:
    // an offline (non-real-time) block waits at most this long for its stems
    static constexpr double kOfflineWaitS = 30.0;
    static constexpr int kOpenTimeoutMs = 60000; // an open, an engine's start included
    // in real time an open waits at most this long for an engine it started (the next tries, every
    // kRetryS, find it once it answers); offline it waits up to kOpenTimeoutMs
    static constexpr int kRealtimeStartWaitMs = 1000;
    static constexpr double kRetryS = 2.0;  // after a failed open, the same open is not retried sooner
    static constexpr double kResetGraceMs = 250.0; // see sessionLoop
    static constexpr int kNumStemBuses = (int) kStemNames.size(); // aux output buses 1..7, one per stem

    UnbakeProcessor();
    ~UnbakeProcessor() override;

    void prepareToPlay (double sampleRate, int samplesPerBlock) override;
    void releaseResources() override;
    void reset() override;
    bool isBusesLayoutSupported (const BusesLayout& layouts) const override;
    void processBlock (juce::AudioBuffer<float>&, juce::MidiBuffer&) override;
    using AudioProcessor::processBlock;

    juce::AudioProcessorEditor* createEditor() override;
    bool hasEditor() const override { return true; }

    const juce::String getName() const override { return "unbake"; }
    bool acceptsMidi() const override { return false; }
    bool producesMidi() const override { return false; }
    bool isMidiEffect() const override { return false; }
    double getTailLengthSeconds() const override { return 0.0; }

    int getNumPrograms() override { return 1; }
    int getCurrentProgram() override { return 0; }
    void setCurrentProgram (int) override {}
    const juce::String getProgramName (int) override { return {}; }
    void changeProgramName (int, const juce::String&) override {}

    void getStateInformation (juce::MemoryBlock& destData) override;
    void setStateInformation (const void* data, int sizeInBytes) override;

    // For the editor (message thread).
    juce::AudioProcessorValueTreeState& parameters() noexcept { return params; }
    EngineStatus engineStatus() const; // see Status.h
    // The state's endpoint ("" = $UNBAKE_ENDPOINT, else the per-user default) and engine command
    // ("" = $UNBAKE_EXECUTABLE, else no autostart); a change opens a new session (in the background).
    void setEndpoint (const juce::String& endpoint);
    juce::String endpointSetting() const;
    void setEngineCommand (const juce::String& path);
    juce::String engineCommandSetting() const;

    std::string endpoint() const;      // the state's endpoint, else defaultEndpoint()
    std::string engineCommand() const; // the state's engine_command, else $UNBAKE_EXECUTABLE, else ""
    std::string status() const { return engine.status(); }
    int64_t lateFrames() const noexcept { return late.load(); }

private:
    static BusesProperties busesProperties();
    void parameterChanged (const juce::String& parameterID, float newValue) override;
    void openSession (double sampleRate, int channels, bool byHost); // byHost: prepare, layout check, offline block
    bool sessionStale (double rate) const; // under sessionMutex
    void sessionLoop();
    void computeGains (float* gains) const noexcept;
    int skipSilence (const juce::AudioBuffer<float>& buffer, int start, int n) noexcept;
    void renderOffline (juce::AudioBuffer<float>& buffer);
    void renderRealtime (juce::AudioBuffer<float>& buffer);
    void outputStems (juce::AudioBuffer<float>& buffer, int start, int n, const float* gains, bool wait,
                      double deadlineMs);
    void clearOutputs (juce::AudioBuffer<float>& buffer, int start, int n) noexcept;
    void takeSettings (const juce::ValueTree& state);

    juce::AudioProcessorValueTreeState params;
    EngineClient engine;

    std::atomic<float>* modelParam = nullptr;
    std::array<std::atomic<float>*, kStemNames.size()> gainParam {}, muteParam {};

    // the settings of the state (endpoint, engine_command), readable from any thread
    mutable std::mutex settingsMutex;
    juce::String endpointValue, engineCommandValue;
    std::atomic<double> realtimeMarginS { kRealtimeMarginS }; // the state's realtime_margin_ms, else the default

    // the last open's answer, for engineStatus() (never touched by the audio thread)
    mutable std::mutex infoMutex;
    EngineClient::SessionInfo lastInfo;
    std::string lastEndpoint;

    // the session (written off the audio thread while it is stopped)
    bool sessionOk = false, hasAccompanimentStem = false;
    int sessionModel = -1, sessionChannels = 0, numStems = 0;
    double sessionRate = 0;
    std::string sessionEndpoint, sessionCommand;
    std::string hostEndpoint, hostCommand; // what the environment said at the host's last open
    std::array<int, EngineClient::kMaxStems> stemParamIndex {};
    int64_t framesPushed = 0;
    double lastFailMs = 0;     // the last open (good or not); these session fields: under sessionMutex
    double lastHostOpenMs = 0; // the last open by the host's calls
    std::atomic<bool> needsNewSession { false }, active { false };
    std::atomic<double> reopenNotBeforeMs { 0 }; // a reset's new session: not in the background before
    std::atomic<int> openModel { -1 }; // sessionModel, for the parameter listener
    std::mutex sessionMutex; // one openSession at a time (prepare, layout check, offline block, sessionLoop)
    std::atomic<bool> quitSessionThread { false };
    std::thread sessionThread; // last: started when everything above exists

    // stream position (audio thread)
    int64_t preRollLeft = 0;   // output frames of silence before stem frame 0 (the reported latency
                               // + the stream's leading digital silence, never sent: skipSilence)
    int sessionLatency = 0;    // the latency reported for this session
    int64_t debt = 0;          // stem frames owed: replaced by silence when late, dropped when they come
    std::atomic<int64_t> late { 0 };

    JUCE_DECLARE_NON_COPYABLE_WITH_LEAK_DETECTOR (UnbakeProcessor)
};
} // namespace unbake
